"""`smalto train` refuses, with exit status 2 and a message (no traceback), to resume or start from a checkpoint
that does not fit: another model shape (each key named, old → new), another optimizer (the checkpoint named), or
a crafted checkpoint given as `checkpoint.load_from` (which runs nothing); and a save on a full disk stops the same
way, leaving no partial folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.train.conftest import REPO, recipe, run_cli, run_smalto
from tests.train.test_dcp_read import craft_metadata


def refused(p) -> str:
    """The error message, without the line breaks the CLI adds (in the middle of a long path, too)."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return "".join(p.stderr.split())


def test_resume_and_load_from_refuse_what_does_not_fit(tiny_data, tmp_path: Path) -> None:
    rec = recipe(tiny_data, tmp_path / "run", train={"max_duration": "2ba", "eval_batches": 0})
    run_cli(rec, tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert step.is_dir()

    err = refused(run_cli(rec, tmp_path, "model.n_layers=3", "model.d_model=128", check=False))
    assert "n_layers2→3" in err and "d_model64→128" in err and str(step) in err
    assert "checkpoint.autoresume=false" in err and "run_dir" in err

    err = refused(run_cli(rec, tmp_path, "optimizer.name=adamw", check=False))
    assert "optimizer.name'lion'→'adamw'" in err and str(step) in err

    new = recipe(tiny_data, tmp_path / "new", train={"max_duration": "2ba", "eval_batches": 0})
    err = refused(run_cli(new, tmp_path, f"checkpoint.load_from={step}", "model.n_layers=3", check=False))
    assert "n_layers2→3" in err and "checkpoint.load_from" in err

    crafted = tmp_path / "crafted"
    shutil.copytree(tmp_path / "run", crafted)
    craft_metadata(crafted, tmp_path / "marker")
    # a run folder, which load_from takes as `smalto.load` does (it was "neither a checkpoint nor an HF folder")
    err = refused(run_cli(new, tmp_path, f"checkpoint.load_from={crafted}", check=False))
    assert "non-checkpointobject" in err and not (tmp_path / "marker").exists()


FULL_DISK = """
import errno
from torch.distributed.checkpoint.filesystem import FileSystemWriter

def write_data(self, plan, planner):  # part of a shard is written, then the disk is full
    (self.path / "__0_0.distcp").write_bytes(b"x" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")

FileSystemWriter.write_data = write_data
"""


def test_full_disk_exits_2_and_leaves_no_partial_folder(tiny_data, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FULL_DISK)  # every DCP write in the run fails
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_data, tmp_path / "run", train={"max_duration": "1ba"})))
    p = run_smalto(["train", str(path)], env={"PYTHONPATH": f"{tmp_path / 'site'}:{REPO}"}, check=False)
    err = refused(p)
    assert "nospaceleft" in err and "GBneeded" in err and "GBfree" in err
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))
