"""PPO: the formulas on hand-worked numbers (TRL's PPOTrainer definitions), the rollout layout, a short run on a
tiny model that raises a rule reward, the rule scorers, and recipe mistakes."""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext

import pytest
import torch

from smalto.errors import ConfigError
from smalto.model.heads import MPTWithValueHead
from smalto.model.mpt import MPTForCausalLM
from smalto.train.ppo import (
    AdaptiveKL,
    PPOSection,
    gae,
    kl_rewards,
    masked_whiten,
    policy_loss,
    value_loss,
)
from smalto.train.rollout import layout
from smalto.train.scorers import rule_scorer
from tests.helpers import tiny_config
from tests.train.conftest import run_smalto


def test_gae_hand_worked():
    # γ 0.9, λ 0.8 (γλ = 0.72). Row 0, all real: t2 δ = 1 - 3 = -2 → A -2; t1 δ = 0.9·3 - 2 = 0.7 → A = 0.7 - 1.44
    # = -0.74; t0 δ = 0.9·2 - 1 = 0.8 → A = 0.8 - 0.72·0.74 = 0.2672. Row 1 ends after 2 tokens: its third value
    # and reward count as 0: t2 A 0; t1 δ = 2 + 0 + 1 = 3 → A 3; t0 δ = 0.9·(-1) - 0.5 = -1.4 → A = -1.4 + 2.16.
    values = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.2672, -0.74, -2.0], [0.76, 3.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.2672, 1.26, 1.0], [1.26, 2.0, 0.0]]))


def test_kl_rewards_put_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = kl_rewards(torch.tensor([1.0]), logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.0, 0.0]]))


def test_whiten_uses_the_unbiased_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5, unbiased variance 5/3 → (x - 2.5) / 1.2909944
    out = masked_whiten(x, mask)[:, :4]
    torch.testing.assert_close(out, torch.tensor([[-1.1618950, -0.3872983, 0.3872983, 1.1618950]]))


def test_clipped_policy_and_value_losses():
    mask = torch.ones(1, 2)
    # token 0: ρ = e^0.5 = 1.6487, A = 1 → max(-1.6487, -1.2) = -1.2 (clipped); token 1: ρ = 1, A = -2 → 2
    pg, pg_clip = policy_loss(
        torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -1.0]]), torch.tensor([[1.0, -2.0]]), mask, 0.2
    )
    assert pg.item() == pytest.approx(0.4) and pg_clip.item() == pytest.approx(0.5)
    # token 0: V' 1.0 clipped to 0.7 around 0.5: max((1-2)², (0.7-2)²) = 1.69; token 1: 1 → ½·(1.69 + 1)/2
    vf, vf_clip = value_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]]), mask, 0.2
    )
    assert vf.item() == pytest.approx(0.6725) and vf_clip.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    kl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    kl.update(12.0, 1000)  # error clipped to 0.2 → × (1 + 0.2 · 0.1)
    assert kl.value == pytest.approx(0.102)
    fixed = AdaptiveKL(0.1, target=None, horizon=10000)
    fixed.update(12.0, 1000)
    assert fixed.value == 0.1


def test_layout_right_pads_and_points_at_the_predicting_positions():
    ids, positions, targets, mask = layout([[5, 6], [7, 8, 9]], [[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 2, 3], [7, 8, 9, 4, 0]]
    assert positions.tolist() == [[1, 2, 3], [2, 3, 4]]
    assert targets.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_rule_scorers():
    assert rule_scorer("contains:return")(["", ""], ["x\n    return 1", "pass"]).tolist() == [1.0, 0.0]
    assert rule_scorer("ends_with:!")(["", ""], ["hi! \n", "hi"]).tolist() == [1.0, 0.0]
    assert rule_scorer("valid_python")(
        ["def f():\n", "def f():\n"], ["    return 1\n", "    return (\n"]
    ).tolist() == [
        1.0,
        0.0,
    ]
    with pytest.raises(ConfigError, match=r"reward.rule = 'contains' is not a rule; choose one of"):
        rule_scorer("contains")


def test_a_short_ppo_run_raises_the_rule_reward():
    """A random tiny policy rewarded for the share of its response tokens below 64 (a quarter of the vocabulary)
    learns to write them."""
    from smalto.config import OptimizerConfig
    from smalto.train.optim import build_optimizer
    from smalto.train.ppo_trainer import PPOTrainer

    torch.manual_seed(0)
    policy = MPTForCausalLM(
        tiny_config(attn_config={"alibi": True, "attn_impl": "sdpa"}, learned_pos_emb=False)
    )
    policy.eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    model = MPTWithValueHead(policy)

    def score(prompts, responses):
        return torch.tensor([sum(t < 64 for t in r) / len(r) for r in responses])

    section = PPOSection(batch_size=16, mini_batch_size=8, ppo_epochs=4, max_new_tokens=6, kl_coef=0.01)
    trainer = PPOTrainer(
        model,
        nullcontext,
        ref,
        score,
        build_optimizer(model, OptimizerConfig(name="adamw", lr=3e-3, betas=[0.9, 0.95])),
        section,
        pad_id=0,
        eos_id=None,
        seed=0,
    )
    rng = random.Random(0)
    held = [[rng.randrange(1, 256) for _ in range(4)] for _ in range(32)]
    before, _ = trainer.evaluate(held, seed=1)
    for step in range(8):
        stats = trainer.step([[rng.randrange(1, 256) for _ in range(4)] for _ in range(16)], seed=10 + step)
    after, _ = trainer.evaluate(held, seed=1)
    assert before < 0.4 and after > before + 0.2, (before, after)
    for key in (
        "rollout/score",
        "rollout/kl",
        "ppo/entropy",
        "ppo/pg_clipfrac",
        "ppo/vf_loss",
        "time/generation_share",
    ):
        assert key in stats


def test_ppo_section_and_recipe_mistakes():
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size \(3\) must divide ppo.batch_size \(16\)"):
        PPOSection(mini_batch_size=3)
    with pytest.raises(ConfigError, match=r"ppo.temperature = 0 must be > 0"):
        PPOSection(temperature=0)
    p = run_smalto(["ppo", "ppo.cliprang=0.1"], check=False)
    assert p.returncode == 2 and "unknown key ppo.cliprang; allowed keys: steps, batch_size" in p.stderr
    p = run_smalto(["ppo", "reward.model=x"], check=False)
    assert p.returncode == 2 and "reward needs exactly one of reward.model" in p.stderr
    assert "Traceback" not in p.stderr


def test_ppo_with_lora_trains_adapters_and_value_head_over_one_frozen_base():
    """With a lora section the reference is the policy with its adapters off: no second copy of the weights."""
    from types import SimpleNamespace

    from smalto.config import OptimizerConfig
    from smalto.ppo import _reference
    from smalto.train.optim import build_optimizer
    from smalto.train.ppo_trainer import PPOTrainer

    torch.manual_seed(0)
    policy = MPTForCausalLM(
        tiny_config(attn_config={"alibi": True, "attn_impl": "sdpa"}, learned_pos_emb=False)
    )
    policy.eval()
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    ids = torch.randint(1, 256, (2, 8))
    start = policy(ids).logits
    reference, ref_model = _reference(
        SimpleNamespace(lora={"r": 4, "alpha": 8, "targets": "all-linear"}), policy
    )
    assert ref_model is policy
    model = MPTWithValueHead(policy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n or "v_head" in n for n in trainable)
    section = PPOSection(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=4)
    opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-2, betas=[0.9, 0.95]))

    def score(prompts, responses):
        return torch.tensor([sum(t < 64 for t in r) / len(r) for r in responses])

    trainer = PPOTrainer(model, reference, ref_model, score, opt, section, pad_id=0, eos_id=None, seed=0)
    rng = random.Random(0)
    for step in range(2):
        trainer.step([[rng.randrange(1, 256) for _ in range(4)] for _ in range(8)], seed=step)
    now = policy.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())  # the base is frozen
    with reference():
        torch.testing.assert_close(ref_model(ids).logits, start)  # adapters off: the starting model
    assert not torch.allclose(policy(ids).logits, start)  # adapters on: the policy moved
