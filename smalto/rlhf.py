"""What `smalto reward` and `smalto ppo` share: reading a recipe into its dataclass, the device, the tokenizer of
the base model, and the run's metrics log (metrics.jsonl plus a console line).

A recipe is YAML with a fixed set of top-level keys (each command's dataclass); an unknown key, at any level, is
named with the allowed ones. `{run_dir}` in a path is the run's folder (default runs/{name}).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from smalto.config import apply_overrides, fill, find_recipe, read_recipe_file
from smalto.errors import build

T = TypeVar("T")
METRICS = "metrics.jsonl"


def read_recipe(cls: type[T], spec: str, overrides: list[str]) -> T:
    """`spec` (a YAML path or a shipped recipe name) with `a.b=c` overrides, built into `cls` (keys checked)."""
    path = find_recipe(spec)
    d = apply_overrides(read_recipe_file(path), overrides)
    name = d.get("name", "run")
    run_dir = fill("run_dir", str(d.get("run_dir", "runs/{name}")), name=str(name))
    d = _fill_run_dir(d, run_dir)
    d["run_dir"] = run_dir
    return build(cls, d, "")


def _fill_run_dir(d: Any, run_dir: str) -> Any:
    if isinstance(d, dict):
        return {k: _fill_run_dir(v, run_dir) for k, v in d.items()}
    if isinstance(d, list):
        return [_fill_run_dir(v, run_dir) for v in d]
    if isinstance(d, str) and "{run_dir}" in d:
        return d.replace("{run_dir}", run_dir)
    return d


def device_for(name: str) -> Any:
    from smalto.hf.load import parse_device

    return parse_device(name)


def base_tokenizer(base: str, given: str | None) -> tuple[Any, str]:
    """The tokenizer (and its path) of a recipe: `tokenizer:` when given, else the base model's own."""
    from smalto.load import base_tokenizer_path, model_config
    from smalto.tokenizer import load_tokenizer

    model_config(base)  # a path that is no model is named as such before its tokenizer is looked for
    path = given or base_tokenizer_path(base)
    return load_tokenizer(path), str(path)


def prepare_demo(r: Any, demo: str, write: Callable[[str], None]) -> None:
    """When the recipe `r`'s prepare is `demo`: its base model (the tiny demo's export, trained once when missing)
    and the demo data that `write` puts at r.data.path."""
    if r.prepare == demo:
        from smalto.finetune import ensure_base_model

        ensure_base_model(r.base_model)
        write(r.data.path)


def cuda_train_plan(model: Any, batch: int, seq: int) -> None:
    """On CUDA the training attention kernel for `batch` rows of `seq` tokens (smalto.kernels.select); the CPU runs
    sdpa."""
    import torch

    from smalto.kernels import apply, select

    if model.device.type == "cuda":
        plan = select(model.config, "train", device=model.device, dtype=torch.bfloat16, batch=batch, seq=seq)
        apply(model, {"train": plan})


class MetricsLog:
    """One JSON line per step in {run_dir}/metrics.jsonl (rewritten at the start of a run) and a console line
    every `every` steps and at evaluations."""

    def __init__(self, run_dir: str, total: int, every: int = 1, console: Console | None = None):
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")
        self.total, self.every = total, every
        self.console = console or Console(stderr=True)
        self.start = time.monotonic()

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self.file.flush()
        if step % self.every == 0 or step == self.total or any(k.startswith("eval/") for k in metrics):
            shown = "  ".join(
                f"{k.removeprefix('train/')} {_fmt(v)}" for k, v in metrics.items() if k != "time/step_s"
            )
            self.console.print(f"step {step}/{self.total}  {shown}", highlight=False)

    def close(self) -> None:
        self.file.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
