"""The metrics a run writes: JSONL always, TensorBoard event files with the same values when asked; a resumed run
drops what was logged past its checkpoint from both, and survives a torn or half-rewritten metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from tensorboard.backend.event_processing import event_accumulator

from tests.train.conftest import REPO, losses, recipe, run_cli


def test_tensorboard_scalars_equal_the_jsonl_metrics(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    p = run_cli(recipe(tiny_data, run_dir, logging={"progress": False, "tensorboard": True}), tmp_path)
    # the summary table names the attention kernel training ran (on CPU `auto` is SDPA)
    assert any("attention" in line and "sdpa" in line for line in (p.stdout + p.stderr).splitlines())
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tb = [e.value for e in acc.Scalars("train/loss")]
    jsonl = losses(run_dir)
    assert len(jsonl) == 8
    assert tb == pytest.approx(jsonl, rel=1e-6)
    assert "eval/loss" in acc.Tags()["scalars"]


def _rows(run_dir) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]  # every line whole


def test_a_torn_last_line_does_not_block_the_resume(tiny_data, tmp_path):
    """A line cut short (full disk, power loss) is skipped with a warning; the relaunch resumes and the file is
    whole again."""
    rec = recipe(tiny_data, tmp_path / "run")
    run_cli(rec, tmp_path, "train.stop_after=4")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 5, "train/loss": 5.2, "train/gr')  # no newline: the write stopped here
    p = run_cli(rec, tmp_path)
    assert "resumed from" in p.stderr
    assert "skipped 1 unreadable line" in " ".join(p.stderr.split())
    steps = [r["step"] for r in _rows(tmp_path / "run") if "train/loss" in r]
    assert steps == list(range(1, 9))


def test_metrics_rewrite_on_a_full_disk_leaves_the_old_file(tmp_path):
    """The resume's rewrite of metrics.jsonl goes through a temporary file: when the disk fills during it (here a
    file-size limit), the old file is untouched (it was left cut short, or empty)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "train/loss": 1 / s, "pad": "x" * 100}) + "\n" for s in range(1, 21))
    )
    before = path.read_bytes()
    script = f"""
import resource, signal
from pathlib import Path
from smalto.train.metrics import _truncate
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # the disk is full after 1000 bytes
_truncate(Path({str(path)!r}), 15)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 1 and "File too large" in p.stderr, p.stderr[-2000:]
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_tensorboard_has_no_duplicate_steps_after_a_resume(tiny_data, tmp_path):
    """A launch that logged past its last checkpoint (killed, or `latest` moved back by the guard) is resumed:
    TensorBoard purges the steps after the checkpoint, as metrics.jsonl does."""
    run_dir = tmp_path / "run"
    rec = recipe(
        tiny_data,
        run_dir,
        checkpoint={"interval": "4ba", "keep_last": 3},
        logging={"progress": False, "tensorboard": True},
    )
    run_cli(rec, tmp_path)
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")  # steps 5-8 were logged after it
    p = run_cli(rec, tmp_path)
    assert "resumed from" in p.stderr and "step 4" in p.stderr
    assert [r["step"] for r in _rows(run_dir) if "train/loss" in r] == list(range(1, 9))
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    for tag in ("train/loss", "eval/loss"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert not [s for s, n in Counter(steps).items() if n > 1], (tag, steps)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses(run_dir), rel=1e-6)
