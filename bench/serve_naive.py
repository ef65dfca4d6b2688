"""The server a user would write without smalto serve: transformers' `generate` behind a lock, one request at a
time, streamed. The baseline of bench/serve_load.py (it speaks only what that load sends: token-id prompts,
max_tokens, greedy, streaming).

    python bench/serve_naive.py HF_FOLDER --port 8001 [--device cuda] [--dtype bfloat16]
"""

import argparse
import asyncio
import json
import threading
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()

    import transformers
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    model = model.to(a.device).eval()
    app = FastAPI()
    lock = asyncio.Lock()

    class Tokens(BaseStreamer):
        """Hands each new token id to the event loop (the first `put` is the prompt)."""

        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.seen_prompt = loop, queue, False

        def put(self, value: Any) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            for t in value.view(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, t)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = torch.tensor([body["prompt"]], device=a.device)

        async def events():
            async with lock:  # one request at a time
                queue: asyncio.Queue = asyncio.Queue()
                streamer = Tokens(asyncio.get_running_loop(), queue)
                kw = dict(
                    max_new_tokens=body["max_tokens"], min_new_tokens=body["max_tokens"], do_sample=False
                )
                thread = threading.Thread(
                    target=model.generate, args=(ids,), kwargs={**kw, "streamer": streamer}
                )
                thread.start()
                while (t := await queue.get()) is not None:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'text': str(t)}]})}\n\n"
                thread.join()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
