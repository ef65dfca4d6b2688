"""Training checkpoints read safely: real ones ask the metadata unpickler only for DCP's own classes and still load;
a crafted one (code in `.metadata`, or a tensor declared as a pickled bytes item) raises a CheckpointError from
every reader (`smalto.load`, `smalto convert`, resume, `checkpoint.load_from`) and runs nothing. Saving removes
stale and failed partial folders and reports a full disk."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

import smalto
from smalto.config import OptimizerConfig
from smalto.errors import CheckpointError, UserError
from smalto.model.mpt import MPTForCausalLM
from smalto.train.checkpoint import Checkpointer, load_weights
from smalto.train.dcp_read import ALLOWED, _torch_constant
from smalto.train.optim import build_optimizer
from smalto.train.parallel import World
from tests import forkrun
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Marker:
    """Unpickling it creates the marker file: what a crafted checkpoint would do with os.system."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def save_run(
    run: Path, optimizer: str = "lion", stepped: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[MPTForCausalLM, Path]:
    """A run folder with one checkpoint (step 1) of a tiny model, after one optimizer step."""
    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_config()).to(dtype)
    opt = build_optimizer(model, OptimizerConfig(name=optimizer))
    if stepped:
        model(torch.randint(0, 256, (1, 8))).logits.sum().backward()
        opt.step()
    return model, Checkpointer(run / "checkpoints", WORLD).save(1, model, opt, {"step": 1})


@pytest.mark.parametrize("optimizer", ["lion", "adamw"])
def test_real_metadata_asks_only_for_allowed_classes_and_loads(tmp_path: Path, optimizer: str) -> None:
    """The allowed set is what real checkpoints need (recorded this way); the optimizer state comes back whole."""
    asked: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            asked.add((module, name))
            return super().find_class(module, name)

    model, step = save_run(tmp_path, optimizer)
    with open(step / ".metadata", "rb") as f:
        Recorder(f).load()
    assert asked and all(k in ALLOWED or _torch_constant(*k) for k in asked), asked - ALLOWED
    # resume: the model and the optimizer state (tensors and hyperparameters) come back
    fresh = MPTForCausalLM(tiny_config())
    opt = build_optimizer(fresh, OptimizerConfig(name=optimizer))
    assert Checkpointer(tmp_path / "checkpoints", WORLD).load(step, fresh, opt) == {
        "step": 1,
        "world_size": 1,
    }
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert opt.state_dict()["param_groups"][0]["lr"] == OptimizerConfig().lr and opt.state_dict()["state"]


def craft_metadata(run: Path, marker: Path) -> None:
    """Replace the checkpoint's `.metadata` with a pickle that creates `marker` when unpickled."""
    step = next((run / "checkpoints").glob("step_*"))
    (step / ".metadata").write_bytes(pickle.dumps(Marker(marker)))


def craft_bytes_item(run: Path, marker: Path) -> None:
    """Keep real metadata, but declare a weight a pickled bytes item whose pickle creates `marker`: DCP's default
    planner reads bytes items with torch.load(weights_only=False)."""
    step = next((run / "checkpoints").glob("step_*"))
    with open(step / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own, just written
    buf = io.BytesIO()
    torch.save(Marker(marker), buf)
    (step / "evil.distcp").write_bytes(buf.getvalue())
    fqn = "model.transformer.wte.weight"
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo("evil.distcp", 0, len(buf.getvalue()))
    (step / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("craft", [craft_metadata, craft_bytes_item])
def test_crafted_checkpoint_runs_nothing(tmp_path: Path, craft) -> None:
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    save_run(run)
    craft(run, marker)
    step = next((run / "checkpoints").glob("step_*"))
    expected = "non-checkpoint object"
    with pytest.raises(CheckpointError, match=expected):
        smalto.load(run)
    model = MPTForCausalLM(tiny_config())
    opt = build_optimizer(model, OptimizerConfig(name="lion"))
    with pytest.raises(CheckpointError, match=expected):  # autoresume
        Checkpointer(run / "checkpoints", WORLD).load(step, model, opt)
    with pytest.raises(CheckpointError, match=expected):  # checkpoint.load_from
        load_weights(str(run / "checkpoints"), model, WORLD)
    p = forkrun.run(
        [sys.executable, "-m", "smalto", "convert", str(run), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert p.returncode == 2 and expected in " ".join(p.stderr.split()), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not marker.exists()


def test_stale_partial_folders_are_removed_when_a_checkpointer_starts(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    (folder / ".step_00000007.tmp" / "rng").mkdir(parents=True)
    (folder / ".step_00000007.tmp" / "__0_0.distcp").write_bytes(b"partial")
    Checkpointer(folder, WORLD, remove_stale=False)  # a load_from source: only read
    assert (folder / ".step_00000007.tmp").exists()
    Checkpointer(folder, WORLD)
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598"),
    ],
)
def test_full_disk_removes_the_partial_folder_and_says_how_much(tmp_path, monkeypatch, error) -> None:
    model, first = save_run(tmp_path / "run")
    folder = first.parent

    def write_data(self, plan, planner):  # writes part of a shard, then the disk is full
        Path(self.path, "__0_0.distcp").write_bytes(b"x" * 100)
        raise error

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    opt = build_optimizer(model, OptimizerConfig(name="lion"))
    with pytest.raises(
        UserError, match=rf"no space left on {re.escape(str(folder))} \(\d+\.\d GB needed, \d+\.\d GB free\)"
    ):
        Checkpointer(folder, WORLD).save(2, model, opt, {"step": 2})
    assert not list(folder.glob(".*.tmp")) and not (folder / "step_00000002").exists()
    assert (folder / "latest").read_text().strip() == first.name  # the previous checkpoint is still the one


def test_another_model_shape_names_the_keys(tmp_path: Path) -> None:
    _, step = save_run(tmp_path / "run")
    model = MPTForCausalLM(tiny_config(n_layers=3, d_model=128))
    opt = build_optimizer(model, OptimizerConfig(name="lion"))
    with pytest.raises(CheckpointError) as e:
        Checkpointer(step.parent, WORLD).load(step, model, opt)
    msg = str(e.value)
    assert "n_layers 2 → 3" in msg and "d_model 64 → 128" in msg and "checkpoint.autoresume=false" in msg
    with pytest.raises(CheckpointError, match=r"checkpoint\.load_from"):
        load_weights(str(step), model, WORLD)


def test_bf16_checkpoint_names_its_dtype_and_loads(tmp_path: Path) -> None:
    model, step = save_run(tmp_path / "run", dtype=torch.bfloat16)
    assert b"bfloat16" in (step / ".metadata").read_bytes()  # stored as the global torch.bfloat16
    loaded = smalto.load(tmp_path / "run")
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), loaded.state_dict()[k]), k
