"""Exact resume across processes, 2-process FSDP2 (gloo) = 1 process, resume with another world size, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import REPO, losses, recipe, run_cli


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One uninterrupted single-process run of 8 steps."""
    tmp = tmp_path_factory.mktemp("ref")
    run_cli(recipe(tiny_data, tmp / "run"), tmp)
    return tmp / "run"


def test_resume_in_new_process_gives_identical_losses(reference, tiny_data, tmp_path):
    rec = recipe(tiny_data, tmp_path / "run")
    run_cli(rec, tmp_path, "train.stop_after=3")
    assert len(losses(tmp_path / "run")) == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    p = run_cli(rec, tmp_path)
    assert "resumed from" in p.stderr
    assert losses(tmp_path / "run") == losses(reference)  # exactly: same bits, not just close
    assert losses(tmp_path / "run", "eval/loss") == losses(reference, "eval/loss")


@pytest.mark.slow
def test_two_processes_match_one_and_resume_with_other_world_size(reference, tiny_data, tmp_path):
    rec = recipe(tiny_data, tmp_path / "run")
    run_cli(rec, tmp_path, "train.stop_after=4", nproc=2)  # FSDP2 over gloo, 2 × 4 samples per step
    ref = losses(reference)
    two = losses(tmp_path / "run")
    assert len(two) == 4
    torch.testing.assert_close(two, ref[:4], rtol=1e-4, atol=1e-5)
    p = run_cli(rec, tmp_path)  # the sharded checkpoint continues in one process
    assert "world size 1" in p.stderr
    torch.testing.assert_close(losses(tmp_path / "run"), ref, rtol=1e-4, atol=1e-5)

    from smalto.train.checkpoint import load_training_checkpoint

    model = load_training_checkpoint(tmp_path / "run")
    assert not any(torch.isnan(p).any() for p in model.parameters())


def test_sigterm_leaves_a_loadable_checkpoint(tiny_data, tmp_path):
    import yaml

    from smalto.train.checkpoint import find_checkpoint, load_training_checkpoint

    rec = recipe(tiny_data, tmp_path / "run", train={"max_duration": "100000ba"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smalto", "train", str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt is not None
    step = json.loads((ckpt / "trainer.json").read_text())["step"]
    assert step >= 2 and len(losses(tmp_path / "run")) == step
    model = load_training_checkpoint(ckpt)
    ids = torch.randint(0, 384, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


def test_plot_draws_the_run(reference, tmp_path):
    import matplotlib  # noqa: F401  (a dev dependency: the test must run, not skip)

    from smalto.plot import plot_run

    out = plot_run(reference, tmp_path / "curves.png")
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = subprocess.run(
        [sys.executable, "-m", "smalto", "plot", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert p.returncode == 2 and "metrics.jsonl does not exist" in " ".join(p.stderr.split())
