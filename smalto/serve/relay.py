"""From the engine's outputs to HTTP answers: collect them into one answer, or relay them as server-sent events;
a client that goes away cancels its requests (the engine frees their slots at its next step)."""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from smalto.errors import UserError
from smalto.serve.engine import Engine, Output
from smalto.serve.engine import Request as EngineRequest
from smalto.serve.protocol import APIError


class Mailbox:
    """Outputs from the engine thread to one event loop's queues. The first output after the loop last emptied
    the mailbox wakes the loop (`call_soon_threadsafe`, a write to its self-pipe); the others of that step only
    join the list: one wake-up a step for all its rows, not one a token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.items.append((queue, item))
            if len(self.items) > 1:
                return  # a wake-up is on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Callable[[asyncio.Queue, Any], None]:
    """The `post` of `loop`'s mailbox (one per loop)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box.post


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
    """Outputs as they come, until every request has finished; an engine error ends the stream with it. Outputs
    that queued up while the client's stream was busy go out together, one merged output per request (as vLLM's
    output collector merges deltas): under load a streamed event can carry several tokens."""
    left = len(reqs)
    while left:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        merged: dict[int, Output] = {}
        for i, out in batch:
            if out.error is not None:
                raise APIError(500, out.error)
            if out.finish_reason is not None:
                left -= 1
            if i in merged:
                merge(merged[i], out)
            else:
                merged[i] = out
        for i, out in merged.items():
            yield i, out


def merge(into: Output, out: Output) -> None:
    """Append `out` (a later output of the same request) to `into`."""
    into.text += out.text
    into.token_ids = into.token_ids + out.token_ids
    into.n_tokens += out.n_tokens
    into.logprobs = into.logprobs + out.logprobs
    into.finish_reason = out.finish_reason or into.finish_reason
    into.prompt_logprobs = out.prompt_logprobs or into.prompt_logprobs


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
            merge(merged[i], out)
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
