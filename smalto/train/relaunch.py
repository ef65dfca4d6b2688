"""A relaunch that resumes a run is compared with the recipe the run was started with (`RUN/config.yaml`), before
anything is built or written.

  - A change the checkpoint cannot take (a model key that changes tensor shapes, another optimizer, another global
    batch or data seed, with which the data stream cannot resume where it stopped) is refused,
    naming each key old → new and how to start a new run instead; `config.yaml`, `latest` and `hf/` stay as
    they were.
  - A change that alters the learning-rate schedule or what a step means (duration, lr, warmup, scheduler, batch,
    sequence length), or what the model computes without changing its shapes (ALiBi, norms ...), is allowed
    with a warning that names it: the run goes on from its step under the new settings.
Everything else (logging, evaluation, intervals, time limits, device) changes freely.
`smalto reward` and `smalto ppo` compare their `RUN/recipe.yaml` the same way (`check_recipe_relaunch`, with the
keys each command names; smalto.train.resume).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from smalto.config import RunConfig
from smalto.errors import CheckpointError
from smalto.model.config import MPTConfig

SCHEDULE = ("train.max_duration", "data.seq_len", "optimizer.lr")
SCHEDULE_SECTIONS = ("scheduler.",)
DATA_STREAM = ("train.global_batch_size", "data.seed")  # the data stream resumes exactly only with these kept
SAME_MATH = ("model.attn_config.attn_impl", "model.init_device")  # another kernel or device, the same model


def check_relaunch(cfg: RunConfig, *, warn: bool = True) -> None:
    """Refuse or warn (when `warn`: rank 0) about what changed since the run's first launch; nothing when it does
    not resume."""
    from smalto.train.checkpoint import LATEST, RESUME_FIX, _changes_shapes, _flat

    pointer = Path(cfg.checkpoint.folder) / LATEST
    saved_file = Path(cfg.run_dir) / "config.yaml"
    if not cfg.checkpoint.autoresume or not pointer.is_file() or not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
        saved_model = MPTConfig.from_dict(saved["model"])
    except Exception:  # unreadable: the checkpoint's own model.json check still runs at load
        return
    checkpoint = Path(cfg.checkpoint.folder) / pointer.read_text().strip()
    model_json = checkpoint / "model.json"
    if model_json.is_file():  # the weights' own shapes, when the saved recipe was edited by hand
        try:
            saved_model = MPTConfig.from_dict(json.loads(model_json.read_text()))
            saved["model"] = saved_model.to_dict()
        except Exception:
            pass
    old, new = _flat(saved), _flat(cfg.to_dict())
    changed = [k for k in new if k in old and old[k] != new[k]]
    breaking = [
        k
        for k in changed
        if (k.startswith("model.") and _changes_shapes(saved_model, k[len("model.") :], new[k]))
        or k == "optimizer.name"
        or k in DATA_STREAM
    ]
    refuse(cfg.run_dir, checkpoint, breaking, old, new, RESUME_FIX)
    schedule = [k for k in changed if k in SCHEDULE or k.startswith(SCHEDULE_SECTIONS)]
    if warn:
        warn_schedule(cfg.run_dir, schedule, old, new)
    computes = [
        k
        for k in changed
        if k.startswith("model.") and k not in breaking and k not in SAME_MATH and ".init_config." not in k
    ]
    if computes and warn:
        warnings.warn(
            f"resuming {cfg.run_dir} with other model settings ({_changes(computes, old, new)}): the weights "
            "load, but the model they were trained in computed something else",
            stacklevel=2,
        )


def check_recipe_relaunch(
    run_dir: str,
    saved_file: Path,
    recipe: dict[str, Any],
    checkpoint: Path,
    *,
    fixed: tuple[str, ...],
    schedule: tuple[str, ...],
    fix: str,
    warn: bool = True,
) -> None:
    """The same comparison for a command whose whole recipe is saved as YAML (`smalto reward`, `smalto ppo`): a
    changed key in `fixed` (a key, or a section ending in ".") is refused; one in `schedule` is warned about."""
    from smalto.train.checkpoint import _flat

    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError):
        return  # unreadable: the checkpoint's own model.json check still runs at load
    if not isinstance(saved, dict):
        return
    old, new = _flat(saved), _flat(recipe)
    changed = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    refuse(run_dir, checkpoint, [k for k in changed if _matches(k, fixed)], old, new, fix)
    if warn:
        warn_schedule(run_dir, [k for k in changed if _matches(k, schedule)], old, new)


def refuse(
    run_dir: str, checkpoint: Path, breaking: list[str], old: dict[str, Any], new: dict[str, Any], fix: str
) -> None:
    if breaking:
        raise CheckpointError(
            f"{run_dir} was started with another {_keys(breaking)} ({_changes(breaking, old, new)}), which "
            f"its checkpoint {checkpoint} cannot take; to continue the run, leave "
            f"{'it' if len(breaking) == 1 else 'them'} as before; {fix}"
        )


def warn_schedule(run_dir: str, schedule: list[str], old: dict[str, Any], new: dict[str, Any]) -> None:
    if schedule:
        warnings.warn(
            f"resuming {run_dir} with a changed schedule ({_changes(schedule, old, new)}): the learning rate "
            "and the run's length follow the new values from the resumed step on",
            stacklevel=3,
        )


def _matches(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) or key.startswith(k + ".") for k in keys)


def _keys(keys: list[str]) -> str:
    return ", ".join(keys)


def _changes(keys: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys)
