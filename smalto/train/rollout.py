"""PPO rollouts: sample responses with smalto's decoder, lay them out, score them, and build the `Experience`.

    sample(policy, prompts, ...)       responses (token ids) from smalto.generate (static KV cache, the compiled
                                       CUDA-graph decode step on GPU); a response that stopped at EOS keeps it
    layout(prompts, responses, pad)    (B, T) rows prompt + response, right-padded, and for each response token
                                       the position that predicts it: causal attention alone keeps padding out,
                                       so no attention mask is needed and any training kernel runs
    experience(...)                    old log-probabilities and values of the policy, the reference's
                                       log-probabilities, the KL-penalised rewards, GAE and whitened advantages
Scorers (what gives the scalar reward of a whole response) are in smalto/train/scorers.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from smalto.model.mpt import MPTForCausalLM
from smalto.train.ppo import Experience, PPOSection, gae, kl_rewards, masked_whiten, response_logprobs


def sample(
    policy: MPTForCausalLM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int | None,
    seed: int,
) -> list[list[int]]:
    from smalto.generate import generate

    outs = generate(
        policy,
        None,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=[] if eos_token_id is None else eos_token_id,
        seed=seed,
    )
    return [
        o.token_ids + ([eos_token_id] if o.finish_reason == "eos" and eos_token_id is not None else [])
        for o in outs
    ]


def layout(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids (B, T), positions (B, R), targets (B, R), mask (B, R) float); rows whose response is empty get one
    masked position (they add nothing to any mean)."""
    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    R = max(1, max(len(r) for r in responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros(B, R, dtype=torch.long)
    targets = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        n = len(r)
        positions[b] = torch.clamp(torch.arange(len(p) - 1, len(p) - 1 + R), max=T - 1)
        targets[b, :n] = torch.tensor(r, dtype=torch.long)
        mask[b, :n] = 1.0
    return ids, positions, targets, mask


@torch.no_grad()
def experience(
    model: Any,
    reference: Callable[[], AbstractContextManager[Any]],
    ref_model: Any,
    ids: Tensor,
    positions: Tensor,
    targets: Tensor,
    mask: Tensor,
    scores: Tensor,
    section: PPOSection,
    kl_coef: float,
    autocast: Any,
) -> tuple[Experience, dict[str, float]]:
    """Everything the update needs from one rollout batch; `reference()` is the context in which `ref_model`
    computes the reference (a frozen copy: nothing to do; LoRA: the adapters switched off), and its stats."""
    logprobs, values, ref_logprobs = [], [], []
    step = max(1, ids.shape[0] // max(1, ids.shape[0] // 8))  # forwards of a few rows at a time
    for i in range(0, ids.shape[0], step):
        sl = slice(i, i + step)
        with autocast:
            logits, v = model(ids[sl])
        lp, _ = response_logprobs(logits, positions[sl], targets[sl], section.temperature)
        logprobs.append(lp)
        values.append(torch.gather(v, 1, positions[sl]))
        with reference(), autocast:
            ref_logits = ref_model(ids[sl]).logits
        ref_logprobs.append(response_logprobs(ref_logits, positions[sl], targets[sl], section.temperature)[0])
    lp, vals, ref = torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs)
    if section.score_clip is not None:
        scores = scores.clamp(-section.score_clip, section.score_clip)
    rewards, kl = kl_rewards(scores, lp, ref, mask, kl_coef)
    if section.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(vals, rewards, mask, section.gamma, section.lam)
    exp = Experience(
        ids=ids,
        positions=positions,
        targets=targets,
        mask=mask,
        logprobs=lp,
        values=vals * mask,
        advantages=masked_whiten(advantages, mask),
        returns=returns,
    )
    stats = torch.stack(
        [
            scores.float().mean(),
            scores.float().std() if len(scores) > 1 else torch.zeros(()),
            kl.sum(1).mean(),
            mask.sum(1).mean(),
        ]
    ).tolist()
    return exp, {
        "rollout/score": stats[0],
        "rollout/score_std": stats[1],
        "rollout/kl": stats[2],
        "rollout/length": stats[3],
    }
