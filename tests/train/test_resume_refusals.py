"""`smalto train` refuses, with exit status 2 and a message (no traceback), to resume or start from a checkpoint
that does not fit: another model shape (each key named, old → new), another optimizer (the checkpoint named), or
a crafted checkpoint given as `checkpoint.load_from` (which runs nothing)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.train.conftest import recipe, run_cli
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
    assert f"cannotload{step}" in err and "anotheroptimizer" in err

    new = recipe(tiny_data, tmp_path / "new", train={"max_duration": "2ba", "eval_batches": 0})
    err = refused(run_cli(new, tmp_path, f"checkpoint.load_from={step}", "model.n_layers=3", check=False))
    assert "n_layers2→3" in err and "checkpoint.load_from" in err

    crafted = tmp_path / "crafted"
    shutil.copytree(tmp_path / "run", crafted)
    craft_metadata(crafted, tmp_path / "marker")
    # a run folder, which load_from takes as `smalto.load` does (it was "neither a checkpoint nor an HF folder")
    err = refused(run_cli(new, tmp_path, f"checkpoint.load_from={crafted}", check=False))
    assert "non-checkpointobject" in err and not (tmp_path / "marker").exists()
