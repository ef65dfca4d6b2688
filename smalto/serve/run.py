"""`serve(...)`: load a model, build the engine and the app, and run uvicorn until SIGTERM / SIGINT.

A signal stops admitting at once (new requests get 503, /health turns 503), lets running requests finish for
`grace` seconds, aborts what is left, and returns: the process exits with status 0.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

from smalto.errors import UserError


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's graceful shutdown, then a normal return (uvicorn re-raises the signal, ending with 143)."""

        engine: Any = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.engine is not None:
                self.engine.stop_admitting()
            super().handle_exit(sig, frame)

    return Server


def check_host(host: str, api_key: str | None) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        import warnings

        warnings.warn(
            f"serving on {host} without --api-key: anyone who reaches it can use the model", stacklevel=2
        )


def serve(
    model_path: str,
    *,
    tokenizer: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 256,
    max_seq_len: int | None = None,
    prefill_chunk: int = 2048,
    dtype: str | None = None,
    device: str | None = None,
    served_model_name: str | None = None,
    grace: float = 30.0,
    adapter: str | None = None,
    quantize: Any = None,
    on_ready: Any = None,
) -> None:
    """Load the model (quantized with `quantize`, a smalto.quant.QuantSpec, as `smalto.load` does) and serve it."""
    try:
        import uvicorn
    except ImportError:
        raise UserError('smalto serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    from smalto.load import load_model_and_tokenizer
    from smalto.serve.app import create_app
    from smalto.serve.engine import Engine

    check_host(host, api_key)
    model, tok = load_model_and_tokenizer(
        model_path,
        tokenizer,
        dtype=dtype,
        device=device,
        max_seq_len=max_seq_len,
        adapter=adapter,
        quantize=quantize,
    )
    model.eval()
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    app = create_app(engine, served_model_name or model_path, api_key, root=model_path)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=max(1, int(grace))
    )
    server = _server_class()(config)
    server.engine = engine
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    server.run()
