"""The metrics a run writes: JSONL always, TensorBoard event files with the same values when asked."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing import event_accumulator

from tests.train.conftest import losses, recipe, run_cli


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
