"""What `smalto reward` and `smalto ppo` share: reading a recipe into its dataclass, the device, the tokenizer of
the base model, the checkpoint section (smalto.train.resume saves and resumes), and the run's metrics log
(metrics.jsonl plus a console line).

A recipe is YAML with a fixed set of top-level keys (each command's dataclass); an unknown key, at any level, is
named with the allowed ones. `{run_dir}` in a path is the run's folder (default runs/{name}).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from smalto.config import apply_overrides, fill, find_recipe, parse_duration, read_recipe_file
from smalto.errors import ConfigError, build

T = TypeVar("T")
METRICS = "metrics.jsonl"


@dataclass(kw_only=True)
class CheckpointSection:
    """A run's checkpoints, with `smalto train`'s keys (docs/rlhf.md#checkpoints-and-resume)."""

    interval: int | str = "50ba"
    """Save every this many steps (the last step, `stop_after` and a SIGTERM/SIGINT always save)."""
    keep_last: int = 3
    folder: str = "{run_dir}/checkpoints"
    autoresume: bool = True
    """Continue from `latest` in `folder` when it exists; false trains from scratch."""

    def __post_init__(self) -> None:
        amount, unit = parse_duration(self.interval, "checkpoint.interval")
        if unit != "ba" or amount < 1 or amount != int(amount):
            raise ConfigError(
                f"checkpoint.interval = {self.interval!r} must be a whole number of steps ≥ 1, e.g. 50 or '50ba'"
            )
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last = {self.keep_last} must be at least 1")

    @property
    def every(self) -> int:
        return int(parse_duration(self.interval, "checkpoint.interval")[0])


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
    """One JSON line per step in {run_dir}/metrics.jsonl and a console line every `every` steps and at
    evaluations. A fresh run (`start` 0) rewrites the file; a run resumed at step `start` keeps the rows up to it
    (`rows`) and drops those logged after its checkpoint."""

    def __init__(
        self, run_dir: str, total: int, every: int = 1, console: Console | None = None, *, start: int = 0
    ):
        from smalto.train.durable import replace_durably

        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if start and self.path.is_file() else []
        self.rows = [row for row in map(json.loads, lines) if row["step"] <= start]
        replace_durably(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self.file = self.path.open("a")
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


def show_stopped(console: Any, stopped: str, steps: int, checkpoint: Any) -> None:
    """What a run that stopped before its last step prints: why, where its checkpoint is, how to go on."""
    console.print(
        f"stopped ({stopped}) after step {steps}; checkpoint: {checkpoint}\nrelaunch the same command to continue",
        markup=False,
        highlight=False,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
