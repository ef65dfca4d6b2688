"""Fixtures for the data tests: the real GPT-NeoX tokenizer from ../shared, and a CLI runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import forkrun

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER = Path(__file__).parents[2] / ".." / "shared" / "tokenizers" / "gpt-neox-20b"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    assert TOKENIZER.is_dir(), f"the data tests read the tokenizer at {TOKENIZER}"
    return TOKENIZER


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def eos_id(tok) -> int:
    return tok.token_to_id("<|endoftext|>")


def run_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`smalto ...` in a fresh interpreter, as a user runs it."""
    return forkrun.run(
        [sys.executable, "-m", "smalto", *map(str, args)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
