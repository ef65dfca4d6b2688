"""Relaunching a run, as a user does: a change the checkpoint cannot take is refused before anything is written
(config.yaml, latest and hf/ checksummed), a schedule change is named in a warning; a missing dataset is named
before anything is built; off a terminal, training prints plain progress lines; the time limit is per launch."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

from smalto.train.setup import Trainer
from tests.train.conftest import losses, recipe, run_cli


def digests(run: Path) -> dict[str, str]:
    files = [run / "config.yaml", run / "checkpoints" / "latest", *sorted((run / "hf").iterdir())]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def flat(text: str) -> str:
    return " ".join(text.split())


def test_relaunch_refuses_what_breaks_the_checkpoint_and_names_schedule_changes(
    tiny_data, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    rec = recipe(
        tiny_data,
        run,
        train={"max_duration": "2ba", "eval_batches": 0},
        checkpoint={"hf_export": "{run_dir}/hf"},
        logging={"progress": True, "print_interval": 1, "tensorboard": False},  # captured: not a terminal
    )
    p = run_cli(rec, tmp_path)
    err = flat(p.stderr)
    assert "step 1/2 loss " in err and "step 2/2 loss " in err and " tok/s ETA " in err
    before = digests(run)

    p = run_cli(rec, tmp_path, "model.n_layers=3", "optimizer.name=adamw", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    err = flat(p.stderr)
    assert "model.n_layers 2 → 3, optimizer.name 'lion' → 'adamw'" in err
    assert "checkpoint.autoresume=false" in err and "set another run_dir" in err
    assert digests(run) == before  # refused before anything was written

    p = run_cli(rec, tmp_path, "train.max_duration=3ba", "optimizer.lr=0.001")
    err = flat(p.stderr)
    assert "warning: resuming" in err and "UserWarning" not in err
    assert "with a changed schedule (optimizer.lr 0.003 → 0.001, train.max_duration '2ba' → '3ba')" in err
    assert "resumed from" in err and len(losses(run)) == 3


def test_a_missing_dataset_is_named_before_anything_is_built(tiny_data, tmp_path: Path) -> None:
    rec = recipe(tiny_data, tmp_path / "run")
    p = run_cli(rec, tmp_path, f"data.sources=[{{path: {tmp_path / 'c4'}}}]", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    c4 = tmp_path / "c4"
    assert f"data.sources[0].path = {c4} has no {c4 / 'train' / 'index.json'}: point it at" in p.stderr
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_the_time_limit_counts_this_launch_only() -> None:
    cfg = SimpleNamespace(train=SimpleNamespace(time_limit="60s"))
    world = SimpleNamespace(device="cpu", world_size=1)
    printed: list[str] = []
    resumed = SimpleNamespace(  # 2 h trained by earlier launches, 10 s by this one
        seconds=7200.0,
        launch_seconds=10.0,
        step=5,
        total_steps=10,
        world=world,
        cfg=cfg,
        logger=SimpleNamespace(print=printed.append),
    )
    assert Trainer.out_of_time(resumed, 60.0) is False  # type: ignore[arg-type]
    resumed.launch_seconds = 61.0
    assert Trainer.out_of_time(resumed, 60.0) is True  # type: ignore[arg-type]
    assert printed == ["time limit 60s (this launch) reached at step 5/10"]
    assert Trainer.out_of_time(resumed, math.inf) is False  # type: ignore[arg-type]
