"""Streamed text: the pieces `TextStream` hands out, joined, are `tokenizer.decode(ids)`, through the Rust
incremental decoder and through the windowed fallback alike, for GPT-NeoX's byte-level BPE (real text, emoji and
CJK split inside characters, random ids) and a LLaMA-style byte-fallback tokenizer (first space stripped); stop
strings cut the text before them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from smalto.serve import text as text_mod
from smalto.serve.text import TextStream
from smalto.tokenizer import load_tokenizer
from tests.test_llama import byte_fallback_tokenizer

SAMPLE = "Hello there. héllo wörld, 日本語のテキスト 🙂🚀 don't  stop\n\tthe quick brown fox."


def stream(tok, ids: list[int], stops: list[str] = []) -> tuple[str, TextStream]:  # noqa: B006
    ts, out = TextStream(tok, stops), ""
    for i in ids:
        out += ts.add(i)
        if ts.stopped:  # the engine ends the sequence there
            return out, ts
    return out + ts.finish(), ts


@pytest.fixture(params=["rust", "windowed"])
def path(request, monkeypatch) -> str:
    if request.param == "windowed":
        monkeypatch.setattr(text_mod, "_decode_stream", lambda tok: (None, None))
    return request.param


def test_neox_stream_is_decode(neox_tokenizer_dir: Path, path: str) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    rng = random.Random(0)
    for ids in (
        tok.encode(SAMPLE, add_special_tokens=False),
        [rng.randrange(tok.vocab_size) for _ in range(400)],  # partial characters, invalid bytes
    ):
        got, ts = stream(tok, ids)
        assert got == tok.decode(ids, skip_special_tokens=False)
        assert (ts._stream is not None) == (path == "rust")


def test_byte_fallback_stream_is_decode(tmp_path: Path, path: str) -> None:
    tok = load_tokenizer(byte_fallback_tokenizer(tmp_path) and tmp_path)
    ids = tok.encode("hello world, the lazy dog 🙂 jumps", add_special_tokens=False)
    assert any(3 <= i < 259 for i in ids)  # the emoji goes through byte tokens
    got, _ = stream(tok, ids)
    assert got == tok.decode(ids, skip_special_tokens=False) == "hello world, the lazy dog 🙂 jumps"


def test_stop_string_cuts_the_text_before_it(neox_tokenizer_dir: Path, path: str) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    ids = tok.encode(SAMPLE, add_special_tokens=False)
    got, ts = stream(tok, ids, ["wörld"])
    assert ts.stopped and got == "Hello there. héllo "
