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


PACKAGE = MODEL_DIR.parent
REFERENCE_MODEL_FORBIDDEN = (
    "smalto.kernels",
    "smalto.hf",
    "smalto.load",
    "smalto.generate",
    "triton",
    "cudnn",
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The smalto modules `path` imports anywhere in it (lazy imports inside functions too): `from pkg import x`
    counts as importing the module pkg.x where that is a module, else pkg."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "hf_remote" not in p.parts}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_the_model_is_the_plain_reference(path):
    """No kernels, no loading formats, no Triton or cuDNN in smalto/model/: fast paths are applied from outside."""
    for name in _imports(path, set(_graph())) | {
        n.module or "" for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
    }:
        assert not name.startswith(REFERENCE_MODEL_FORBIDDEN), f"{path.name} imports {name}"


def test_the_import_graph_has_no_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " → ".join([*path[path.index(n) :], n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


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
