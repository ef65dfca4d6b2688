"""`smalto serve`: an OpenAI-compatible HTTP server with continuous batching, and a chat page (docs/serve.md).

    slots.py     the KV memory: one static cache of max_batch slots, per-slot positions; prefill chunks, decode step
    engine.py    the continuous-batching loop (one thread): admit, prefill in chunks, decode, sample, stop, evict
    text.py      incremental detokenization with stop strings held back
    protocol.py  request bodies (pydantic), response / stream / error JSON
    app.py       the FastAPI routes; relay.py outputs → JSON answers / SSE streams
    page.html    the chat page; metrics.py Prometheus metrics
    run.py       `serve(...)`: load, build, run uvicorn with a graceful SIGTERM
FastAPI, uvicorn and prometheus_client come with the optional extra `serve`; nothing here is imported by
`import smalto`.
"""
