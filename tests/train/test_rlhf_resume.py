"""`smalto reward` and `smalto ppo` resume: N steps in one launch give the same bits as launches stopped by
`stop_after` and relaunched (weights, optimizer, RNG, data position, PPO's KL controller and minibatch order), a
LoRA checkpoint holds only what trains, a SIGINT leaves a checkpoint the relaunch continues from, and a changed
recipe is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smalto.errors import CheckpointError
from tests import forkrun
from tests.helpers import tiny_config
from tests.train.conftest import REPO

NATIVE = {"no_bias": True, "attn_config": {"alibi": True, "attn_impl": "sdpa"}}


@pytest.fixture(scope="module")
def base(tmp_path_factory, neox_tokenizer_dir) -> Path:
    """A tiny MPT with dropout (the resumed RNG matters) and the real GPT-NeoX tokenizer, as an HF folder."""
    from smalto.hf.save import save_pretrained
    from smalto.model.mpt import MPTForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resume") / "base"
    cfg = tiny_config(vocab_size=50432, max_seq_len=64, resid_pdrop=0.1, **NATIVE)
    save_pretrained(MPTForCausalLM(cfg).eval(), folder, tokenizer=str(neox_tokenizer_dir))
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    words = ["apple", "river", "stone", "cloud", "music", "paper", "glass", "tiger"]
    rows = [{"prompt": f"Item {i}: {words[i % 8]}", "chosen": " yes", "rejected": " no"} for i in range(20)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    words = ["apple", "river", "stone", "cloud", "music", "paper", "glass", "tiger"]
    rows = [{"prompt": f"Write about {words[i % 8]} number {i}:"} for i in range(24)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def reward_args(base: Path, pairs: str, run: Path, *more: str) -> list[str]:
    return [
        "prepare=null",
        f"base_model={base}",
        f"data.path={pairs}",
        f"run_dir={run}",
        "device=cpu",
        "reward.steps=6",
        "reward.batch_size=4",
        "reward.eval_fraction=0.2",
        "reward.eval_every=3",
        "optimizer.lr=1e-3",
        "scheduler.warmup=2ba",  # warmup, then linear to 0: the schedule depends on the step
        "checkpoint.interval=100",  # only stop_after and the last step save
        *more,
    ]


def ppo_args(base: Path, prompts: str, run: Path, *more: str) -> list[str]:
    return [
        "prepare=null",
        f"base_model={base}",
        f"data.path={prompts}",
        f"run_dir={run}",
        "device=cpu",
        "data.eval_prompts=4",
        "data.max_prompt_tokens=16",
        "reward.rule=contains:e",
        "ppo.steps=4",
        "ppo.batch_size=4",
        "ppo.mini_batch_size=2",
        "ppo.ppo_epochs=2",
        "ppo.max_new_tokens=6",
        "ppo.kl_target=0.5",  # the adaptive controller: its coefficient is part of the state
        "ppo.kl_horizon=20",
        "optimizer.lr=1e-3",
        *more,
    ]


def train_rows(run: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    for k in x:
        assert torch.equal(x[k], y[k]), k


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def test_reward_stopped_twice_and_resumed_equals_one_launch(base, pairs, tmp_path):
    from smalto.reward import run_reward

    one = run_reward("tiny-reward", reward_args(base, pairs, tmp_path / "one"))
    assert one.stopped is None and one.steps == 6
    run = tmp_path / "run"
    first = run_reward("tiny-reward", reward_args(base, pairs, run, "reward.stop_after=2"))
    assert first.stopped == "stop_after" and first.folder is None and latest(run) == "step_00000002"
    second = run_reward("tiny-reward", reward_args(base, pairs, run, "reward.stop_after=2"))
    assert second.stopped == "stop_after" and second.steps == 4 and latest(run) == "step_00000004"
    last = run_reward("tiny-reward", reward_args(base, pairs, run))
    assert last.stopped is None and last.steps == 6 and latest(run) == "step_00000006"
    assert_same_tensors(run / "hf" / "model.safetensors", tmp_path / "one" / "hf" / "model.safetensors")
    for key in ("train/loss", "train/lr", "eval/accuracy"):
        assert train_rows(run, key) == train_rows(tmp_path / "one", key), key
    assert (last.accuracy_before, last.accuracy_after) == (one.accuracy_before, one.accuracy_after)


def test_reward_relaunch_with_another_batch_size_is_refused(base, pairs, tmp_path):
    from smalto.reward import run_reward

    run = tmp_path / "run"
    run_reward("tiny-reward", reward_args(base, pairs, run, "reward.stop_after=1"))
    recipe = (run / "recipe.yaml").read_bytes()
    with pytest.raises(CheckpointError) as e:
        run_reward("tiny-reward", reward_args(base, pairs, run, "reward.batch_size=2"))
    assert f"{run} was started with another reward.batch_size (reward.batch_size 4 → 2)" in str(e.value)
    assert "checkpoint.autoresume=false" in str(e.value)
    assert (run / "recipe.yaml").read_bytes() == recipe and latest(run) == "step_00000001"
    with pytest.warns(UserWarning, match=r"changed schedule \(reward.steps 6 → 2\)"):
        done = run_reward("tiny-reward", reward_args(base, pairs, run, "reward.steps=2"))
    assert done.steps == 2 and latest(run) == "step_00000002"


def test_ppo_stopped_and_resumed_equals_one_launch(base, prompts, tmp_path):
    from smalto.ppo import run_ppo

    one = run_ppo("tiny-ppo", ppo_args(base, prompts, tmp_path / "one"))
    run = tmp_path / "run"
    first = run_ppo("tiny-ppo", ppo_args(base, prompts, run, "ppo.stop_after=2"))
    assert first.stopped == "stop_after" and first.steps == 2 and latest(run) == "step_00000002"
    last = run_ppo("tiny-ppo", ppo_args(base, prompts, run))
    assert last.stopped is None and last.steps == 4
    assert_same_tensors(run / "hf" / "model.safetensors", tmp_path / "one" / "hf" / "model.safetensors")
    kl = train_rows(tmp_path / "one", "ppo/kl_coef")
    assert len({v for _, v in kl}) == 4  # the controller moved every step: its resumed value is compared
    for key in ("ppo/kl_coef", "rollout/score", "ppo/pg_loss", "ppo/vf_loss", "eval/score"):
        assert train_rows(run, key) == train_rows(tmp_path / "one", key), key
    assert (last.score_before, last.score_after) == (one.score_before, one.score_after)


def test_ppo_lora_checkpoint_holds_adapters_and_value_head_only(base, prompts, tmp_path):
    from smalto.ppo import run_ppo
    from smalto.train.dcp_read import read_metadata

    lora = ("lora.r=4", "lora.alpha=8", "lora.targets=all-linear")
    run_ppo("tiny-ppo", ppo_args(base, prompts, tmp_path / "one", *lora))
    run = tmp_path / "run"
    run_ppo("tiny-ppo", ppo_args(base, prompts, run, *lora, "ppo.stop_after=3"))
    keys = [
        k
        for k in read_metadata(run / "checkpoints" / "step_00000003").state_dict_metadata
        if k.startswith("model.")
    ]
    assert keys and all(".lora." in k or "v_head" in k for k in keys), keys
    assert any("v_head" in k for k in keys)
    run_ppo("tiny-ppo", ppo_args(base, prompts, run, *lora))
    adapters = "adapter_model.safetensors"
    assert_same_tensors(run / "hf" / adapters, tmp_path / "one" / "hf" / adapters)


def test_sigint_leaves_a_checkpoint_the_relaunch_continues(base, pairs, tmp_path):
    """Ctrl-C: the step in progress ends, a checkpoint is saved, exit 130; the same command continues it."""
    run = tmp_path / "run"
    args = reward_args(base, pairs, run, "reward.steps=100000", "log_every=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "smalto", "reward", "tiny-reward", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped (SIGINT)" in err and "relaunch the same command to continue" in err
    step = json.loads((run / "checkpoints" / latest(run) / "trainer.json").read_text())["step"]
    assert step >= 2 and [s for s, _ in train_rows(run, "train/loss")] == list(range(1, step + 1))
    p = forkrun.run(
        [sys.executable, "-m", "smalto", "reward", "tiny-reward", *args, "reward.stop_after=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert [s for s, _ in train_rows(run, "train/loss")] == list(range(1, step + 2))
    assert latest(run) == f"step_{step + 1:08d}"
