"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), autoresume, and the HF export.

A checkpoint folder `FOLDER/step_00001000/` holds
  - the DCP files of {"model", "optim"} (each rank writes its shards; any world size can read them back),
  - `model.json`: the model config; `trainer.json`: step, tokens, schedule position, data-loader state, guard window, counters (rank 0),
  - `rng/rank{r}.pt`: each rank's Python / numpy / torch (and CUDA) RNG states.
It is written under a temporary name and renamed when complete (our own files fsynced before, the folder after:
DCP fsyncs its shards), then `FOLDER/latest` (a one-line text file
naming the folder) is replaced atomically, and all but the newest `keep_last` are deleted. A crash mid-save leaves
the previous checkpoint and pointer untouched. The folder must be shared by all ranks (one node, or a shared FS).
`smalto.load` reads a checkpoint (or a run folder: `find_checkpoint`) back for inference, with overrides.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from smalto.errors import CheckpointError
from smalto.hf import load_pretrained, save_pretrained
from smalto.model.mpt import MPTForCausalLM
from smalto.train.durable import fsync_dir, replace_durably, write_synced
from smalto.train.parallel import World, full_state_dict

LATEST = "latest"
TRAINER = "trainer.json"
MODEL = "model.json"  # the MPTConfig, so a checkpoint loads without its recipe


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, folder: str | Path, world: World, *, keep_last: int = 3):
        self.folder = Path(folder)
        self.world = world
        self.keep_last = keep_last

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
        model_sd, optim_sd = get_state_dict(model, optimizer)
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
        self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Load model (and optimizer) shards in place, with any world size; returns the trainer state."""
        if not (path / TRAINER).is_file():
            raise CheckpointError(f"{path} is not a smalto training checkpoint (no {TRAINER})")
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state = {"model": get_model_state_dict(model)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path))
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, state["model"])
        trainer = json.loads((path / TRAINER).read_text())
        rng_file = path / "rng" / f"rank{self.world.rank}.pt"
        if trainer.get("world_size") == self.world.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return trainer


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
    """Initialise weights from a smalto checkpoint folder (DCP) or an HF folder (full state dict on each rank)."""
    p = Path(path)
    if (p / LATEST).is_file():
        p = p / (p / LATEST).read_text().strip()
    if (p / TRAINER).is_file():
        Checkpointer(p.parent, world).load(p, model, None)
        return
    if not (p / "config.json").is_file():
        raise CheckpointError(f"checkpoint.load_from = {path}: neither a smalto checkpoint nor an HF folder")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    hf = load_pretrained(str(p), device="cpu")
    set_model_state_dict(model, hf.state_dict(), options=StateDictOptions(full_state_dict=True))


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
