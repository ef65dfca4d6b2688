"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), autoresume, and the HF export.

A checkpoint folder `FOLDER/step_00001000/` holds
  - the DCP files of {"model", "optim"} (each rank writes its shards; any world size can read them back),
  - `model.json`: the model config; `trainer.json`: step, tokens, schedule position, data-loader state, guard window, counters (rank 0),
  - `rng/rank{r}.pt`: each rank's Python / numpy / torch (and CUDA) RNG states.
It is written under a temporary name and renamed when complete (our own files fsynced before, the folder after:
DCP fsyncs its shards), then `FOLDER/latest` (a one-line text file
naming the folder) is replaced atomically, and all but the newest `keep_last` are deleted. A crash mid-save leaves
the previous checkpoint and pointer untouched, and the next Checkpointer on that folder removes the partial one; a
save that fails (a full disk) removes its partial folder and says how much space it needed. The folder must be
shared by all ranks (one node, or a shared FS).
Loading reads DCP's pickled metadata with a restricted unpickler (smalto.train.dcp_read), so a crafted checkpoint
runs no code, and refuses a checkpoint of another model shape or optimizer with a message instead of a traceback.
`smalto.load` reads a checkpoint (or a run folder: `find_checkpoint`) back for inference, with overrides.
"""

from __future__ import annotations

import errno
import io
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from smalto.errors import CheckpointError, UserError
from smalto.hf import load_pretrained, save_pretrained
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from smalto.train.dcp_read import dcp_cause, load_dcp
from smalto.train.durable import fsync_dir, replace_durably, write_synced
from smalto.train.parallel import World, full_state_dict

LATEST = "latest"
TRAINER = "trainer.json"
MODEL = "model.json"  # the MPTConfig, so a checkpoint loads without its recipe
RESUME_FIX = (
    "to start a new run instead, set another run_dir (or checkpoint.folder), or checkpoint.autoresume=false to "
    "train from scratch here"
)
LOAD_FROM_FIX = (
    "set checkpoint.load_from to a checkpoint of this model, or leave it out to train from scratch"
)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(
        self,
        folder: str | Path,
        world: World,
        *,
        keep_last: int = 3,
        remove_stale: bool = True,
        trainable_only: bool = False,
    ):
        """`remove_stale`: delete the partial `.step_*.tmp` folders a killed save left (rank 0); False for a folder
        that is only read (`checkpoint.load_from`), whose own run may be saving into it. `trainable_only`: save
        and resume only the parameters that train (LoRA: the adapters, not the frozen base)."""
        self.folder = Path(folder)
        self.world = world
        self.keep_last = keep_last
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        if remove_stale and world.is_main:
            for stale in self.folder.glob(".step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    # ---- finding ----
    def latest(self) -> Path | None:
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        if not (path / TRAINER).is_file():
            raise CheckpointError(
                f"{pointer} names {path}, which is not a complete checkpoint; fix or delete {pointer}"
            )
        return path

    def saved(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("step_*") if (p / TRAINER).is_file())

    def point_latest(self, path: Path) -> None:
        """Make `path` the one autoresume continues from (rank 0 only)."""
        if self.world.is_main:
            replace_durably(self.folder / LATEST, path.name + "\n")

    # ---- saving ----
    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any]
    ) -> Path:
        final = self.folder / step_name(step)
        tmp = self.folder / f".{step_name(step)}.tmp"
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.world.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", UserWarning
                )  # one process: "assuming the intent is to save in a single process"
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            rng = io.BytesIO()
            torch.save(rng_state(), rng)
            write_synced(tmp / "rng" / f"rank{self.world.rank}.pt", rng.getvalue())
            fsync_dir(tmp / "rng")
            if self.world.is_main:
                config: Any = model.config
                write_synced(tmp / MODEL, json.dumps(config.to_dict(), indent=1))
                write_synced(
                    tmp / TRAINER, json.dumps({**trainer, "world_size": self.world.world_size}, indent=1)
                )
                fsync_dir(tmp)
        except (OSError, RuntimeError, CheckpointException) as e:
            shutil.rmtree(tmp, ignore_errors=True)  # no partial folder stays behind (it would fill the disk)
            free = shutil.disk_usage(self.folder).free
            need = state_bytes(model_sd) + state_bytes(optim_sd)
            if _no_space(e) or free < need:
                raise UserError(
                    f"no space left on {self.folder} ({need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free) to "
                    f"save step {step}; free some space or set checkpoint.folder to a larger disk"
                ) from None
            raise
        self.world.barrier()
        if self.world.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.folder)
            self.point_latest(final)
            for old in self.saved()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()
        return final

    # ---- loading ----
    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        fix: str = RESUME_FIX,
    ) -> dict[str, Any]:
        """Load model (and optimizer) shards in place, with any world size; returns the trainer state. `fix` ends
        the message when the checkpoint does not fit the model or optimizer (how to start without it)."""
        if not (path / TRAINER).is_file():
            raise CheckpointError(f"{path} is not a smalto training checkpoint (no {TRAINER})")
        config: Any = model.config
        check_shapes(path, config, fix)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
            state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            # weights for a model with adapters (LoRA on this base): the base's tensors, the adapters start fresh
            state = {"model": {k: v for k, v in get_model_state_dict(model).items() if ".lora." not in k}}
        try:
            load_dcp(state, path)  # the restricted unpickler: a crafted checkpoint raises, runs nothing
        except CheckpointError:
            raise
        except (
            Exception,
            CheckpointException,
        ) as e:  # the model fits (checked): another optimizer, or damage
            cause = dcp_cause(e).rstrip(".")
            if optimizer is None:
                raise CheckpointError(f"cannot read the weights of {path} ({cause}); {fix}") from None
            raise CheckpointError(
                f"cannot load {path} into this run's optimizer ({type(optimizer).__name__}): was it saved with "
                f"another optimizer? (DCP says: {cause}); {fix}"
            ) from None
        if optimizer is not None:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
                options=self.options,
            )
        else:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
        trainer = json.loads((path / TRAINER).read_text())
        rng_file = path / "rng" / f"rank{self.world.rank}.pt"
        if trainer.get("world_size") == self.world.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return trainer


def check_shapes(path: Path, config: MPTConfig, fix: str) -> None:
    """Refuse a checkpoint whose saved model config gives other tensor shapes than `config`, naming each key."""
    file = path / MODEL
    if not file.is_file():
        return  # DCP's own check still names the tensors
    try:
        saved = MPTConfig.from_dict(json.loads(file.read_text()))
    except (ValueError, UserError) as e:
        raise CheckpointError(f"{file} is not a model config smalto can read ({e})") from None
    if _shapes(saved) == _shapes(config):
        return
    old, new = _flat(saved.to_dict()), _flat(config.to_dict())
    differ = [k for k in {**old, **new} if old.get(k) != new.get(k)]
    shape_keys = [k for k in differ if _changes_shapes(saved, k, new.get(k))] or differ
    changes = ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in shape_keys)
    raise CheckpointError(
        f"{path} was saved from a model of another shape ({changes}), so it does not fit; {fix}"
    )


def _shapes(config: MPTConfig) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in MPTForCausalLM(config, device="meta").named_parameters()}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _changes_shapes(saved: MPTConfig, key: str, value: Any) -> bool:
    """Whether changing this one (dotted) key of `saved` alone changes its tensors' shapes."""
    top, _, sub = key.partition(".")
    try:
        changed = saved.replace(**{top: {sub: value} if sub else value})
    except (UserError, TypeError, ValueError):
        return True  # not valid alone: it goes with another change, so name it
    return _shapes(changed) != _shapes(saved)


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict; a DTensor counts whole, so every rank gets the global size."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _no_space(e: BaseException) -> bool:
    """A write that failed for lack of space: ENOSPC, or torch's zip writer's "unexpected pos" on a full disk,
    directly or wrapped in DCP's exception (one per rank) or as a cause."""
    seen: list[BaseException] = [e]
    visited: set[int] = set()
    while seen:
        x = seen.pop()
        if id(x) in visited:
            continue
        visited.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(x) or "No space left" in str(x):
            return True
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            seen += [f[0] for f in failures.values()]
        seen += [c for c in (x.__cause__, x.__context__) if c is not None]
    return False


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers, so it loads with `torch.load(weights_only=True)`."""
    version, mt, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    kind, keys, pos, has_gauss, cached = np_state
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_weights(path: str, model: torch.nn.Module, world: World) -> None:
    """Initialise weights from a smalto checkpoint (a step_* folder, checkpoints/ or a run folder: DCP) or an HF
    folder (full state dict on each rank)."""
    p = Path(path)
    ckpt = find_checkpoint(p)  # a step folder, a checkpoints folder or a run folder
    if ckpt is not None:
        Checkpointer(ckpt.parent, world, remove_stale=False).load(ckpt, model, None, fix=LOAD_FROM_FIX)
        return
    if not (p / "config.json").is_file():
        raise CheckpointError(f"checkpoint.load_from = {path}: neither a smalto checkpoint nor an HF folder")
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    hf = load_pretrained(str(p), device="cpu")
    # a model with adapters (LoRA) has tensors of its own beyond the base's: every base tensor must still load
    lora = {k for k in model.state_dict() if ".lora." in k}
    result = set_model_state_dict(
        model, hf.state_dict(), options=StateDictOptions(full_state_dict=True, strict=not lora)
    )
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora." not in k]
    if missing:
        raise CheckpointError(f"checkpoint.load_from = {path} lacks {missing[0]}")


def export_hf(
    model: torch.nn.Module, path: str | Path, world: World, *, tokenizer: str | None = None
) -> MPTForCausalLM | None:
    """Gather the full weights on rank 0 and write an HF folder; returns the plain model there (None elsewhere)."""
    sd = full_state_dict(model)  # a collective: every rank takes part
    if not world.is_main:
        return None
    config: Any = model.config
    plain = MPTForCausalLM(config, device="meta")
    plain.load_state_dict(sd, assign=True)
    plain.eval()
    save_pretrained(plain, str(path), tokenizer=tokenizer)
    return plain


def find_checkpoint(path: str | Path) -> Path | None:
    """The training checkpoint a path means: a step folder, a checkpoints folder or a run folder (its latest)."""
    p = Path(path)
    for folder in (p, p / "checkpoints"):
        if (folder / TRAINER).is_file():
            return folder
        if (folder / LATEST).is_file():
            return folder / (folder / LATEST).read_text().strip()
    return None
