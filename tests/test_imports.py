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


HF_DIR = MODEL_DIR.parent / "hf"
HF_FORBIDDEN = ("smalto.train", "smalto.load", "smalto.cli", "smalto.eval")


def _imported(tree: ast.AST, package: str) -> list[str]:
    """Every module or name an import statement names, absolute (`from smalto import load` → smalto.load)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            )
            module = ".".join(p for p in (base, node.module or "") if p)
            names += [module, *(f"{module}.{a.name}" for a in node.names)]
    return names


@pytest.mark.parametrize("path", sorted(HF_DIR.glob("*.py")), ids=lambda p: p.name)
def test_hf_imports_no_training_loading_or_cli(path):
    """smalto.hf reads and writes HF folders; `smalto.load` and the trainer build on it, never the reverse."""
    for name in _imported(ast.parse(path.read_text()), "smalto.hf"):
        assert not any(name == f or name.startswith(f + ".") for f in HF_FORBIDDEN), (
            f"{path.name} imports {name}"
        )
