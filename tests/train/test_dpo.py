"""`smalto dpo` on the training loop: the policy's log-probs equal transformers' on the base folder, a run starts
at loss log 2 (policy = reference) and its held-out reward accuracy rises, resume is exact, 2 ranks under FSDP2 with
cached reference log-probs give the single process's losses, the demo's property moves, recipe mistakes exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import tiny_config
from tests.train.conftest import run_smalto


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory) -> Path:
    """A random tiny MPT that transformers loads natively, with the tiny stdlib tokenizer, as an HF folder."""
    from smalto.hf.save import save_pretrained
    from smalto.model.mpt import MPTForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(
        vocab_size=384, max_seq_len=128, no_bias=True, attn_config={"alibi": True, "attn_impl": "sdpa"}
    )
    folder = tmp_path_factory.mktemp("dpo") / "base"
    save_pretrained(MPTForCausalLM(cfg).eval(), str(folder), tokenizer=tiny_data["tokenizer"])
    return folder


def pairs(path: Path) -> str:
    """Answers that end with a full stop are chosen over the same answers ending with "!"."""
    colours = ["red", "blue", "green", "black", "white", "gold"]
    rows = [
        {"prompt": f"Say {c} {n}:", "chosen": f" {c}.", "rejected": f" {c}!"}
        for n in range(6)
        for c in colours
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(base: Path, tmp: Path, run: str, **dpo) -> str:
    r = {
        "name": run,
        "run_dir": str(tmp / run),
        "seed": 5,
        "base_model": str(base),
        "data": {"sources": [{"path": pairs(tmp / "pairs.jsonl")}], "eval_fraction": 0.25, "max_length": 32},
        "dpo": {"beta": 0.1, **dpo},
        "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0},
        "scheduler": {"name": "constant"},
        "train": {
            "max_duration": "6ba", "global_batch_size": 4, "micro_batch_size": 2, "device": "cpu",
            "precision": "fp32", "eval_first": True, "eval_interval": "6ba", "eval_batches": 4,
        },
        "checkpoint": {"interval": "100ba", "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False},
    }  # fmt: skip
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    from smalto.dpo import dpo

    tmp = tmp_path_factory.mktemp("runs")
    straight = dpo(recipe(base, tmp, "straight"))
    split = recipe(base, tmp, "split")
    first = dpo(split, ["train.stop_after=3"])
    second = dpo(split)
    return {"tmp": tmp, "straight": straight, "first": first, "second": second}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_starts_at_log_2_and_held_out_reward_accuracy_rises(runs):
    r = runs["straight"]
    assert r.train.stopped is None and r.train.steps == 6
    assert r.eval_before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert r.eval_before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert r.eval_after["eval/loss"] < r.eval_before["eval/loss"] - 0.05
    assert r.eval_after["eval/rewards/accuracies"] > 0.5
    first = _metrics(runs["tmp"] / "straight")[1]  # step 1: the first training step's log line
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected"):  # fmt: skip
        assert key in first and f"eval/{key}" in r.eval_after
    assert (runs["tmp"] / "straight" / "hf" / "config.json").is_file()


def test_resume_is_exact(runs):
    losses = [m["train/loss"] for m in _metrics(runs["tmp"] / "straight") if "train/loss" in m]
    resumed = [m["train/loss"] for m in _metrics(runs["tmp"] / "split") if "train/loss" in m]
    assert runs["first"].train.stopped == "stop_after" and runs["second"].train.steps == 6
    assert resumed == losses  # bit-exact across the relaunch


def test_policy_log_probs_equal_transformers(base):
    from transformers import AutoModelForCausalLM

    from smalto.load import load
    from smalto.train.dpo import sequence_logps

    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    ours, counts, _ = sequence_logps(load(str(base), device="cpu").eval(), ids, labels)
    hf = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(ours, (logp * mask).sum(-1), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [7, 4]


def test_demo_property_moves(base, tmp_path):
    """The tiny-dpo recipe, short, on the test's tiny model: the share of held-out prompts answered with a
    docstring rises."""
    from smalto.dpo import dpo

    r = dpo(
        "tiny-dpo",
        [f"base_model={base}", f"run_dir={tmp_path / 'demo'}", "train.device=cpu", "train.max_duration=8ba",
         "train.time_limit=null", "train.eval_interval=8ba", "train.global_batch_size=8", "data.max_length=64",
         "optimizer.lr=1.0e-2", "logging.progress=false", "logging.tensorboard=false"],
    )  # fmt: skip
    assert r.demo is not None and r.demo.rate_after is not None
    assert r.demo.rate_after >= r.demo.rate_before + 0.3, (r.demo.rate_before, r.demo.rate_after)


def test_recipe_mistakes_are_named_and_exit_2(base, tmp_path):
    from smalto.dpo import load_dpo_config
    from smalto.errors import ConfigError

    path = recipe(base, tmp_path, "bad")
    for args, message in [
        (["dpo.beta_typo=1"], "dpo.beta_typo"),
        (["dpo.loss_type=hinge"], "sigmoid, ipo"),
        (["data.seq_len=64"], "data.max_length"),
        (["data.truncation_mode=middle"], "keep_start, keep_end"),
        (["checkpoint.load_from=elsewhere"], "differs from base_model"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_dpo_config(path, args)
    out = run_smalto(["dpo", path, "dpo.loss_type=hinge"], check=False)
    assert out.returncode == 2 and "sigmoid, ipo" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_two_processes_under_fsdp2_match_one(runs, base):
    """torchrun with 2 ranks (gloo): FSDP2-sharded policy and reference, the reference's log-probs precomputed
    (each rank its share) instead of read each step; the global loss of each step equals the single process's."""
    tmp = runs["tmp"]
    path = recipe(base, tmp, "fsdp", precompute_ref_log_probs=True)
    out = run_smalto(["dpo", path, "train.max_duration=3ba"], nproc=2, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    one = [m["train/loss"] for m in _metrics(tmp / "straight") if "train/loss" in m][:3]
    two = [m["train/loss"] for m in _metrics(tmp / "fsdp") if "train/loss" in m]
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
