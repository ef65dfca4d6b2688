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
    if breaking:
        raise CheckpointError(
            f"{cfg.run_dir} was started with another {_keys(breaking)} ({_changes(breaking, old, new)}), which "
            f"its checkpoint {checkpoint} cannot take; to continue the run, leave "
            f"{'it' if len(breaking) == 1 else 'them'} as before; {RESUME_FIX}"
        )
    schedule = [k for k in changed if k in SCHEDULE or k.startswith(SCHEDULE_SECTIONS)]
    if schedule and warn:
        warnings.warn(
            f"resuming {cfg.run_dir} with a changed schedule ({_changes(schedule, old, new)}): the learning rate "
            "and the run's length follow the new values from the resumed step on",
            stacklevel=2,
        )
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


def _keys(keys: list[str]) -> str:
    return ", ".join(keys)


def _changes(keys: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k} {old[k]!r} → {new[k]!r}" for k in keys)
