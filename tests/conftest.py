import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


if (
    _no_cuda()
):  # Triton kernels run in its interpreter on CPU; set before any module defines a @triton.jit function
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`: `-n 2`), each worker's torch takes its share of the cores instead of all of
    them, so the workers' thread pools do not contend."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"tests read ../shared next to the repo; not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def neox_tokenizer_dir(shared_dir: Path) -> Path:
    return shared_dir / "tokenizers" / "gpt-neox-20b"
