"""From the engine's outputs to HTTP answers: collect them into one answer, or relay them as server-sent events;
a client that goes away cancels its requests (the engine frees their slots at its next step)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from smalto.errors import UserError
from smalto.serve.engine import Engine, Output
from smalto.serve.engine import Request as EngineRequest
from smalto.serve.protocol import APIError


def encode(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    from smalto.generate import encode_prompts

    try:
        return encode_prompts(tokenizer, [prompt])[0]  # type: ignore[arg-type]
    except UserError as e:
        raise APIError(400, f"prompt: {e}", "prompt") from None


def sampling_check(body: Any) -> None:
    try:
        body.sampling()
    except UserError as e:
        raise APIError(400, str(e)) from None


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def relay(queue: asyncio.Queue, reqs: list[EngineRequest]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs as they come, until every request has finished; an engine error ends the stream with it."""
    left = len(reqs)
    while left:
        i, out = await queue.get()
        if out.error is not None:
            raise APIError(500, out.error)
        if out.finish_reason is not None:
            left -= 1
        yield i, out


async def collect(queue: asyncio.Queue, reqs: list[EngineRequest], request: Request) -> list[Output]:
    """Every request's whole output, merged; cancels them when the client goes away."""
    merged = [Output() for _ in reqs]
    try:
        it = relay(queue, reqs).__aiter__()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    nxt.cancel()
                    raise asyncio.CancelledError
            try:
                i, out = nxt.result()
            except StopAsyncIteration:
                return merged
            m = merged[i]
            m.text += out.text
            m.token_ids += out.token_ids
            m.n_tokens += out.n_tokens
            m.logprobs += out.logprobs
            m.finish_reason = out.finish_reason or m.finish_reason
            m.prompt_logprobs = out.prompt_logprobs or m.prompt_logprobs
    finally:
        for r in reqs:
            r.cancel()  # no-op for finished ones; frees the slots of the others


def stream(
    events: AsyncIterator[str], reqs: list[EngineRequest], engine: Engine, path: str
) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
            engine.metrics.requests.labels(path, "200").inc()
        except APIError as e:  # headers are sent: the error goes in the stream
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancel()  # the client went away (or the stream ended): free the slots at the next step

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
