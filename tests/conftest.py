import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"tests read ../shared next to the repo; not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def neox_tokenizer_dir(shared_dir: Path) -> Path:
    return shared_dir / "tokenizers" / "gpt-neox-20b"
