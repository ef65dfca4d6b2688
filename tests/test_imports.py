"""The model package is single-device code: no distributed, training, I/O or CLI imports (STYLE.md §3.1)."""

import ast
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "smalto" / "model"
FORBIDDEN = (
    "torch.distributed",
    "smalto.train",
    "smalto.data",
    "smalto.cli",
    "smalto.serve",
    "smalto.eval",
    "rich",
    "typer",
    "yaml",
)


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_model_imports_stay_single_device(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
    assert "print(" not in path.read_text(), f"{path.name} prints"
