"""The HTTP side: FastAPI routes of the OpenAI API over the engine, the chat page, health and metrics.

Each route validates its body (protocol.py), turns it into engine `Request`s (one per prompt × n), submits them
and relays the engine's `Output`s, as one JSON answer or as server-sent events ending with `data: [DONE]`. The
engine thread hands outputs to the event loop through a mailbox (relay.py): one wake-up of the loop for all the
outputs of a step. A client that goes away cancels its requests; the engine frees their slots at its next step.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from smalto.serve.engine import Draining, Engine, Output, QueueFull
from smalto.serve.engine import Request as EngineRequest
from smalto.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_logprob,
    completion_logprobs,
    new_id,
    now,
    usage,
)
from smalto.serve.relay import collect, encode, mailbox, relay, sampling_check, sse, stream


def create_app(
    engine: Engine, model_name: str, api_key: str | None = None, root: str | None = None
) -> FastAPI:
    """The app serving `engine` as `model_name`; `root`: the folder it was loaded from (`/v1/models`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.warmup()
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="smalto", lifespan=lifespan)
    tok = engine.tokenizer
    L = engine.max_seq_len

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        route = request.scope.get(
            "route"
        )  # not the raw path: unknown paths must not grow the metric's series
        engine.metrics.requests.labels(getattr(route, "path", "other"), str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {err.get('msg')}", None
        elif param is None and err.get("type") in ("model_attributes_type", "dict_type"):
            msg = f"the body must be a JSON object of the request's fields, got {err.get('input')!r:.80}"
        else:
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            if param is None:  # a check across fields names its field first: "Value error, max_tokens: ..."
                named = re.match(r"Value error, (\w+)\b", str(err.get("msg", "")))
                param = named.group(1) if named else None
            msg = f"{param or 'body'}: {err.get('msg')}{got}"
        return await api_error(request, APIError(400, msg, param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """Starlette's own refusals (an unknown path, a wrong method, a body that cannot be read as text) in
        OpenAI's error shape too."""
        msg = str(e.detail)
        if e.status_code == 400 and "parsing the body" in msg:
            msg = "the body is not valid JSON (it must be UTF-8 JSON text)"
        return await api_error(request, APIError(e.status_code, msg, None, headers=dict(e.headers or {})))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.accepting else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("smalto.serve").joinpath("page.html").read_text("utf-8"))

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": now(),
            "owned_by": "smalto",
            "root": root or model_name,
            "parent": None,
            "max_model_len": L,
        }
        return {"object": "list", "data": [card]}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model"
            )

    def check_prompt(ids: list[int], max_tokens: int, field: str) -> None:
        V = engine.model.config.vocab_size
        if not ids:
            raise APIError(400, f"{field}: the prompt has no tokens", field)
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise APIError(400, f"{field}: token id {bad[0]} is outside the vocabulary [0, {V})", field)
        if len(ids) >= L:
            raise APIError(
                400, f"{field}: {len(ids)} tokens leave no room to generate in {L} (--max-seq-len)", field
            )
        if len(ids) + max_tokens > L:
            raise APIError(
                400,
                f"max_tokens: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed the context of {L} "
                f"tokens (--max-seq-len); ask for at most {L - len(ids)}",
                "max_tokens",
            )

    async def run(
        request: Request,
        body: Any,
        prompts: list[list[int]],
        max_tokens: list[int],
        stops: list[str],
        top: int | None,
    ) -> tuple[asyncio.Queue, list[EngineRequest]]:
        """Submit n requests per prompt (max_tokens: one per prompt); their outputs arrive on the queue as (choice
        index, Output)."""
        post = mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        reqs: list[EngineRequest] = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                i = p * body.n + j

                def emit(out: Output, i: int = i) -> None:
                    post(queue, (i, out))

                reqs.append(
                    EngineRequest(
                        prompt=ids,
                        emit=emit,
                        params=body.sampling(),
                        max_tokens=max_tokens[p],
                        stop=stops,
                        stop_token_ids=set(body.stop_token_ids or []),
                        ignore_eos=body.ignore_eos,
                        seed=None if body.seed is None else body.seed + j,
                        logprobs=top,
                        prompt_logprobs=bool(getattr(body, "echo", False) and top is not None),
                    )
                )
        try:
            for r in reqs:
                engine.submit(r)
        except (QueueFull, Draining) as e:
            for r in reqs:
                r.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
            raise APIError(503, str(e)) from None
        return queue, reqs

    def token_str(t: int) -> str:
        return tok.decode([t]) if tok is not None else str(t)

    # ------------------------------------------------------------ /v1/completions

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        p = body.prompt
        raw = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not raw:
            raise APIError(400, "prompt: give at least one prompt", "prompt")
        prompts = [encode(tok, x) for x in raw]  # type: ignore[arg-type]
        # null: the rest of the context, per prompt (vLLM); 0 (with echo): the prompt alone
        budgets = [
            body.max_tokens if body.max_tokens is not None else max(1, L - len(ids)) for ids in prompts
        ]
        for ids, budget in zip(prompts, budgets, strict=True):
            check_prompt(ids, budget, "prompt")
        sampling_check(body)
        queue, reqs = await run(request, body, prompts, budgets, body.stops(), body.logprobs)
        cid, created = new_id("cmpl"), now()
        n_prompt = sum(len(x) for x in prompts)
        echo = [(tok.decode(ids) if tok is not None else "") if body.echo else "" for ids in prompts]

        def logprobs(out: Output, offset: int, i: int) -> dict[str, Any] | None:
            if body.logprobs is None:
                return None
            items: list[Any] = list(out.prompt_logprobs or []) if body.echo else []
            strs = [token_str(t) for t in prompts[i // body.n]] if (body.echo and out.prompt_logprobs) else []
            strs += [token_str(x.token) for x in out.logprobs]
            items += out.logprobs
            lps = [x.logprob if x is not None else None for x in items]
            # the top `logprobs` tokens and the chosen one: up to logprobs + 1 entries (OpenAI's, vLLM's)
            tops = [
                {**{token_str(t): v for t, v in x.top}, token_str(x.token): x.logprob}
                if x is not None
                else None
                for x in items
            ]
            return completion_logprobs(strs, lps, tops, offset)

        if body.stream:

            async def events() -> AsyncIterator[str]:
                started: set[int] = set()
                offsets = [0] * len(reqs)
                n_out = 0
                async for i, out in relay(queue, reqs):
                    text = out.text
                    if i not in started:
                        started.add(i)
                        text = echo[i // body.n] + text
                    n_out += out.n_tokens
                    choice = {"index": i, "text": text, "logprobs": logprobs(out, offsets[i], i)}
                    choice["finish_reason"] = out.finish_reason
                    offsets[i] += len(text)
                    yield sse(
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": created,
                            "model": model_name,
                            "choices": [choice],
                        }
                    )
                if body.stream_options and body.stream_options.include_usage:
                    u = {"id": cid, "object": "text_completion", "created": created, "model": model_name}
                    yield sse({**u, "choices": [], "usage": usage(n_prompt, n_out)})
                yield "data: [DONE]\n\n"

            return stream(events(), reqs, engine, "/v1/completions")

        outs = await collect(queue, reqs, request)
        choices = []
        for i, out in enumerate(outs):
            text = echo[i // body.n] + out.text
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": logprobs(out, 0, i),
                    "finish_reason": out.finish_reason,
                }
            )
        engine.metrics.requests.labels("/v1/completions", "200").inc()
        n_out = sum(o.n_tokens for o in outs)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage(n_prompt, n_out),
        }

    # ------------------------------------------------------------ /v1/chat/completions

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatRequest, request: Request) -> Any:
        from smalto.tokenizer import apply_chat_template, chat_stop_strings, encode_rendered_chat

        check_model(body.model)
        if tok is None:
            raise APIError(400, "chat needs a tokenizer; start the server with --tokenizer", "messages")
        text = apply_chat_template(tok, [{"role": m.role, "content": m.text()} for m in body.messages])
        ids = encode_rendered_chat(tok, text)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, L - len(ids))
        check_prompt(ids, max_tokens, "messages")
        sampling_check(body)
        top = (body.top_logprobs or 0) if body.logprobs else None
        queue, reqs = await run(
            request, body, [ids], [max_tokens], [*chat_stop_strings(tok), *body.stops()], top
        )
        cid, created = new_id("chatcmpl"), now()

        def logprobs(out: Output) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            return {
                "content": [
                    chat_logprob(token_str(x.token), x.logprob, [(token_str(t), v) for t, v in x.top])
                    for x in out.logprobs
                ]
            }

        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        if body.stream:

            async def events() -> AsyncIterator[str]:
                for i in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield sse(
                        {
                            **head,
                            "choices": [
                                {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                            ],
                        }
                    )
                n_out = 0
                async for i, out in relay(queue, reqs):
                    n_out += out.n_tokens
                    delta = {"content": out.text} if out.text else {}
                    choice = {
                        "index": i,
                        "delta": delta,
                        "logprobs": logprobs(out),
                        "finish_reason": out.finish_reason,
                    }
                    yield sse({**head, "choices": [choice]})
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(len(ids), n_out)})
                yield "data: [DONE]\n\n"

            return stream(events(), reqs, engine, "/v1/chat/completions")

        outs = await collect(queue, reqs, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": logprobs(out),
                "finish_reason": out.finish_reason,
            }
            for i, out in enumerate(outs)
        ]
        engine.metrics.requests.labels("/v1/chat/completions", "200").inc()
        n_out = sum(o.n_tokens for o in outs)
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage(len(ids), n_out)}

    return app
