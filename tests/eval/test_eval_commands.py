"""Documented commands as a user runs them: a task too long for a small model is skipped by name while the rest
runs and is written as it finishes; the lm-eval line of docs/eval.md runs as written (offline, local task)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from smalto.eval import runner
from smalto.eval.run import EvalConfig, run
from tests import forkrun
from tests.eval.conftest import tiny_mpt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory, neox_tokenizer_dir):
    """A model with a 256-token context: gsm8k's generation budget (315 tokens) does not fit."""
    from smalto.hf import save_pretrained

    d = tmp_path_factory.mktemp("short")
    save_pretrained(tiny_mpt(max_seq_len=256), d, tokenizer=str(neox_tokenizer_dir))
    return d


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_tasks_that_do_not_fit_are_skipped_by_name(short_model_dir, data_root, tmp_path):
    out = tmp_path / "g"
    args = [
        "--tasks",
        "gsm8k,copa",
        "--limit",
        "2",
        "--out",
        str(out),
        "--data-root",
        str(data_root),
    ]
    r = forkrun.run(
        [sys.executable, "-m", "smalto", "eval", str(short_model_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and [t["label"] for t in res["tasks"]] == ["copa"]
    assert [s["task"] for s in res["skipped"]] == ["gsm8k/0-shot"]
    assert (
        "315 tokens" in res["skipped"][0]["reason"] and "context is 256 tokens" in res["skipped"][0]["reason"]
    )
    flat = " ".join(r.stderr.split())  # rich wraps long lines
    assert "gsm8k/0-shot skipped" in flat
    # progress within the task, as plain lines off a terminal: copa's 2 items score in one batch
    assert "copa/0-shot: 1/1 batches, ETA 0s" in r.stderr


def test_results_are_written_as_tasks_finish(short_model_dir, data_root, tmp_path, monkeypatch):
    """A run that dies in its second task leaves the first task's result in OUT/results.json."""
    real = runner.run_task
    calls = []

    def dies_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_task", dies_second)
    out = tmp_path / "p"
    cfg = EvalConfig(
        model=str(short_model_dir), tasks=["copa,piqa"], limit=2, out=str(out), data_root=str(data_root)
    )
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and [t["label"] for t in res["tasks"]] == ["copa"]
