"""A tiny MPT with the real GPT-NeoX tokenizer as an HF folder, and a real server on a free 127.0.0.1 port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from smalto.hf import save_pretrained
from smalto.model.mpt import MPTForCausalLM
from smalto.tokenizer import load_tokenizer
from tests.helpers import tiny_config

pytest.importorskip("fastapi", reason="the serve extra (in dev)")


def wait_until_healthy(p: Any, url: str, timeout: float = 90) -> None:
    """Poll a `smalto serve` process's /health until it answers 200; fail with its stderr if it exits first."""
    import httpx

    deadline = time.time() + timeout
    while True:
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "smalto serve did not come up"
        time.sleep(0.2)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (the server's engine thread and the client share the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_chat_model() -> MPTForCausalLM:
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50432, max_seq_len=96, no_bias=True, attn_config={"alibi": True})
    model = MPTForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky logits: greedy near-ties cannot flip a comparison
        model.transformer.wte.weight.mul_(8)
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, neox_tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("serve") / "hf"
    save_pretrained(tiny_chat_model(), out, tokenizer=load_tokenizer(neox_tokenizer_dir))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` in a thread of this process, on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def loaded(model_dir: Path):
    """The folder's model and tokenizer, as `smalto serve` loads them (shared by the servers and the references:
    the model is only read)."""
    from smalto.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir, device="cpu")
    return model.eval(), tok


def start(loaded, api_key: str | None = None, **engine_kw) -> tuple[ThreadServer, object]:
    from smalto.serve.app import create_app
    from smalto.serve.engine import Engine

    engine = Engine(*loaded, **engine_kw)
    return ThreadServer(create_app(engine, "tiny", api_key)), engine


@pytest.fixture(scope="module")
def server(loaded) -> Iterator[ThreadServer]:
    srv, _ = start(loaded, api_key="sekrit", max_batch=8, max_queue=512, prefill_chunk=16)
    yield srv
    srv.stop()
