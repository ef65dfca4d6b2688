"""Exact resume across processes (with dropout too), 2-process FSDP2 (gloo) = 1 process, resume with another world
size, SIGTERM, fsynced checkpoint files, a trainer state that does not grow with the steps."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import forkrun
from tests.train.conftest import REPO, losses, recipe, run_cli


def checkpoint_step(run: Path) -> int:
    """The step recorded in the trainer state of the run's latest checkpoint."""
    from smalto.train.checkpoint import find_checkpoint

    ckpt = find_checkpoint(run)
    assert ckpt is not None, f"{run} has no checkpoint"
    return json.loads((ckpt / "trainer.json").read_text())["step"]


def last_logged_step(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["step"] for r in rows if "train/loss" in r)


@torch.no_grad()
def fixed_batch_loss(path: Path) -> float:
    """Next-token cross-entropy of a fixed (seeded) batch under the model `smalto.load` reads from `path`."""
    import smalto

    model = smalto.load(path)
    ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


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
    rec = recipe(tiny_data, tmp_path / "run", checkpoint={"hf_export": str(tmp_path / "hf")})
    run_cli(rec, tmp_path, "train.stop_after=4", nproc=2)  # FSDP2 over gloo, 2 × 4 samples per step
    ref = losses(reference)
    two = losses(tmp_path / "run")
    assert len(two) == 4
    torch.testing.assert_close(two, ref[:4], rtol=1e-4, atol=1e-5)
    assert checkpoint_step(tmp_path / "run") == last_logged_step(tmp_path / "run") == 4
    p = run_cli(rec, tmp_path)  # the sharded checkpoint continues in one process
    assert "world size 1" in p.stderr
    torch.testing.assert_close(losses(tmp_path / "run"), ref, rtol=1e-4, atol=1e-5)
    assert checkpoint_step(tmp_path / "run") == last_logged_step(tmp_path / "run") == 8

    import smalto

    # the final checkpoint holds exactly the weights exported to HF at the same step
    ckpt = smalto.load(tmp_path / "run").state_dict()
    hf = smalto.load(tmp_path / "hf").state_dict()
    assert ckpt.keys() == hf.keys()
    for k in ckpt:
        assert torch.equal(ckpt[k], hf[k]), k
    assert fixed_batch_loss(tmp_path / "run") == fixed_batch_loss(tmp_path / "run")  # deterministic re-load


def test_gradients_reduced_once_per_step_give_the_same_losses(reference, tiny_data, tmp_path):
    """`train.grad_sync: step` under FSDP2 with accumulation (2 ranks × 2 micro-batches of 2): the gradients are
    reduce-scattered after the last micro-batch only, and the run is the single-process one."""
    rec = recipe(tiny_data, tmp_path / "run", train={"micro_batch_size": 2, "grad_sync": "step"})
    run_cli(rec, tmp_path, nproc=2)
    torch.testing.assert_close(losses(tmp_path / "run"), losses(reference), rtol=1e-4, atol=1e-5)


def test_sigterm_leaves_a_loadable_checkpoint(tiny_data, tmp_path):
    import yaml

    import smalto
    from smalto.train.checkpoint import find_checkpoint

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
    step = checkpoint_step(tmp_path / "run")
    assert step >= 2 and len(losses(tmp_path / "run")) == step == last_logged_step(tmp_path / "run")
    # the checkpoint re-loads to the same model every time, and `convert` carries it (and the run's tokenizer)
    # into an HF folder that computes the same loss
    loss = fixed_batch_loss(ckpt)
    assert math.isfinite(loss) and loss == fixed_batch_loss(ckpt)
    from smalto.convert import convert

    out = convert(tmp_path / "run", tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == (
        Path(tiny_data["tokenizer"]) / "tokenizer.json"
    ).read_bytes()
    assert fixed_batch_loss(out) == loss
    assert smalto.load(ckpt).config.n_layers == 2


def test_resume_with_dropout_is_bit_exact(tiny_data, tmp_path):
    """Dropout draws from the global RNG, which the checkpoint restores; the data loader must not draw from it
    (it did, for its iterator's base seed, after the restore: the first step after the resume differed)."""
    import smalto

    drop = {"resid_pdrop": 0.1, "emb_pdrop": 0.1}
    rec = recipe(tiny_data, tmp_path / "ref", model=drop)
    run_cli(rec, tmp_path)
    rec_resumed = {**rec, "run_dir": str(tmp_path / "run")}
    run_cli(rec_resumed, tmp_path, "train.stop_after=3")
    p = run_cli(rec_resumed, tmp_path)
    assert "resumed from" in p.stderr
    ref = losses(tmp_path / "ref")
    assert losses(tmp_path / "run") == ref  # exactly: same bits, not just close
    # the summary's first loss survives the resume (trainer.json keeps it, not the whole history)
    assert f"{ref[0]:.4f}" in p.stderr
    final, uninterrupted = (
        smalto.load(tmp_path / "run").state_dict(),
        smalto.load(tmp_path / "ref").state_dict(),
    )
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_trainer_state_does_not_grow_with_the_steps(tiny_data, tmp_path):
    """trainer.json holds the guard's window and the first and last losses, not the whole loss history."""
    rec = recipe(
        tiny_data,
        tmp_path / "run",
        train={"max_duration": "12ba", "eval_batches": 0},
        checkpoint={"interval": "4ba", "keep_last": 3},
        guard={"window": 4, "min_history": 4},
    )
    run_cli(rec, tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    early, late = (json.loads((ckpts / f"step_{s:08d}" / "trainer.json").read_text()) for s in (4, 12))
    assert late["step"] == 12 and len(losses(tmp_path / "run")) == 12

    def lists(state, key=""):  # every list in the state, by its path
        if isinstance(state, dict):
            return {k: v for name, sub in state.items() for k, v in lists(sub, f"{key}/{name}").items()}
        return {key: len(state)} if isinstance(state, list) else {}

    assert lists(early) == lists(late)
    assert len(json.dumps(late)) <= len(json.dumps(early)) + 40  # only wider numbers


def test_checkpoint_files_are_fsynced_before_the_rename(tiny_data, tmp_path, monkeypatch):
    """A power loss right after the rename must not leave `latest` or a checkpoint's own files empty."""
    import os

    from smalto.config import RunConfig
    from smalto.train.parallel import init_world
    from smalto.train.setup import setup

    rec = recipe(tiny_data, tmp_path / "run", train={"global_batch_size": 4, "eval_batches": 0})
    t = setup(RunConfig.from_dict(rec), init_world("cpu"))
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    renamed: list[tuple[str, list[str]]] = []  # (what was renamed, what had been fsynced by then)
    real_replace, real_rename = os.replace, Path.rename

    def replace(src, dst, *a, **k):
        renamed.append((Path(dst).name, list(synced)))
        return real_replace(src, dst, *a, **k)

    def rename(self, target):
        renamed.append((Path(target).name, list(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "rename", rename)
    t.ckpt.save(0, t.model, t.optimizer, t.state_dict())
    folder = (tmp_path / "run" / "checkpoints").resolve()
    tmp = folder / ".step_00000000.tmp"
    before_rename = dict(renamed)["step_00000000"]
    for f in (tmp / "trainer.json", tmp / "model.json", tmp / "rng" / "rank0.pt", tmp, tmp / "rng"):
        assert str(f) in before_rename, f
    assert str(folder / ".latest.tmp") in dict(renamed)["latest"]
    assert synced.count(str(folder)) >= 2  # the folder, after each rename
    assert (folder / "latest").read_text() == "step_00000000\n"


def test_plot_draws_the_run(reference, tmp_path):
    import matplotlib  # noqa: F401  (a dev dependency: the test must run, not skip)

    from smalto.plot import plot_run

    out = plot_run(reference, tmp_path / "curves.png")
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = forkrun.run(
        [sys.executable, "-m", "smalto", "plot", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert p.returncode == 2 and "metrics.jsonl does not exist" in " ".join(p.stderr.split())
