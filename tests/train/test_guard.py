"""The NaN and loss-spike guards on planted bad batches, in the real training step."""

from __future__ import annotations

import torch

from smalto.config import RunConfig
from smalto.train.checkpoint import find_checkpoint
from smalto.train.guard import OK, SKIP, STOP
from smalto.train.loop import finish, train_step
from smalto.train.parallel import init_world
from smalto.train.setup import setup
from tests.train.conftest import recipe, run_cli


def _trainer(tiny_data, tmp_path, **guard):
    rec = recipe(
        tiny_data,
        tmp_path / "run",
        guard={"window": 8, "min_history": 4, "patience": 3, **guard},
        train={"global_batch_size": 4, "max_duration": "100ba", "eval_batches": 0},
        scheduler={"name": "constant", "warmup": 0},
    )
    return setup(RunConfig.from_dict(rec), init_world("cpu"))


def _step(t, batch) -> str:
    _, verdict = train_step(t, [batch])
    if verdict != STOP:
        t.step += 1
    return verdict


def _params(t):
    return [p.detach().clone() for p in t.model.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _easy(t):
    return next(iter(t.loader))  # one real batch, repeated: the loss falls fast


def _random(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 384, (4, 64), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "sequence_id": torch.zeros_like(ids)}


def test_nan_loss_is_skipped_without_touching_the_weights(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path, nan="skip")
    easy = _easy(t)
    assert _step(t, easy) == OK
    before = _params(t)
    bad = {**easy, "labels": torch.full_like(easy["labels"], -100)}  # nothing to predict: 0/0
    assert _step(t, bad) == SKIP and t.guard.skipped == 1
    assert _same(before, _params(t))
    assert _step(t, easy) == OK and not _same(before, _params(t))


def test_nan_loss_stops_with_a_checkpoint_of_the_weights_before_it(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path, nan="stop")
    easy = _easy(t)
    for _ in range(3):
        assert _step(t, easy) == OK
    before = _params(t)
    assert _step(t, {**easy, "labels": torch.full_like(easy["labels"], -100)}) == STOP
    result = finish(t, f"guard: {t.guard.reason}")
    assert "loss is nan at step 3" in result.stopped
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_00000003" and _same(before, _params(t))


def test_spike_stop_points_latest_at_the_checkpoint_before_the_spike(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path, spike="stop")
    easy = _easy(t)
    for _ in range(12):
        assert _step(t, easy) == OK
    assert sum(t.guard.history) / len(t.guard.history) < 2.5  # learned the easy batch: spikes will stand out
    t.ckpt.save(t.step, t.model, t.optimizer, t.state_dict())  # step 12, before the spike
    assert [_step(t, _random(i)) for i in range(2)] == [OK, OK]  # within patience: applied, still watching
    t.ckpt.save(t.step, t.model, t.optimizer, t.state_dict())  # step 14, inside the spike
    assert _step(t, _random(2)) == STOP
    result = finish(t, f"guard: {t.guard.reason}")
    assert "since step 12" in result.stopped
    assert find_checkpoint(tmp_path / "run").name == "step_00000012"


def test_spike_skip_drops_each_spiking_batch(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path, spike="skip")
    easy = _easy(t)
    for _ in range(12):
        _step(t, easy)
    before = _params(t)
    assert [_step(t, _random(i)) for i in range(2)] == [SKIP, SKIP]
    assert _same(before, _params(t))
    assert _step(t, easy) == OK  # a normal batch resets the streak
    assert [_step(t, _random(i)) for i in range(3)] == [
        SKIP,
        SKIP,
        STOP,
    ]  # patience in a row: skipping isn't helping


def test_a_guard_stop_exits_3_naming_the_checkpoint_and_how_to_skip(tiny_data, tmp_path):
    """Status 3 (not 1, a crash; not 0, done): a scheduler or a script can tell a run the guard stopped."""
    rec = recipe(
        tiny_data,
        tmp_path / "run",
        optimizer={"lr": 10.0},  # LION moves every weight by ±10 in the first step: the loss explodes
        scheduler={"name": "constant", "warmup": 0},
        guard={"spike_ratio": 1.5, "min_history": 1, "patience": 1},
    )
    p = run_cli(rec, tmp_path, check=False)
    err = " ".join(p.stderr.split())  # rich wraps the prose (not the path)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "stopped by the loss guard after 1 completed steps" in err
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt is not None and f"resume from: {ckpt}" in err
    assert "guard.spike=skip" in err and "guard.nan=skip" in err
