"""One PPO step, timed: sample rollouts (generation), score them, build the experience, update (training).

    PPOTrainer(model, reference, ref_model, score, optimizer, section, pad_id, eos_id)
      .step(prompts, seed) → metrics (reward, KL, entropy, clip fractions, value loss, generation / training share)
      .evaluate(prompts, seed) → mean score of sampled responses (and the responses)
      .state_dict() / .load_state_dict(s)  what a checkpoint holds beyond weights and optimizer: the adaptive KL
                                           coefficient and the minibatch order's generator (rollouts are seeded
                                           by step)
`score(prompts, responses)` maps token ids to scores (B,) (smalto/train/scorers.py); `reference()` is the context
the reference forward runs in (smalto/ppo.py: a frozen copy, or LoRA with the adapters off).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from smalto.model.heads import MPTWithValueHead
from smalto.train.ppo import AdaptiveKL, PPOSection, ppo_update
from smalto.train.rollout import experience, layout, sample

Score = Callable[[list[list[int]], list[list[int]]], Tensor]


class PPOTrainer:
    def __init__(
        self,
        model: MPTWithValueHead,
        reference: Callable[[], AbstractContextManager[Any]],
        ref_model: Any,
        score: Score,
        optimizer: torch.optim.Optimizer,
        section: PPOSection,
        *,
        pad_id: int,
        eos_id: int | None,
        seed: int,
    ):
        self.model, self.reference, self.ref_model, self.score = model, reference, ref_model, score
        self.optimizer, self.section, self.pad_id, self.eos_id = optimizer, section, pad_id, eos_id
        self.dev = model.policy.device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.dev.type == "cuda" else nullcontext()
        )
        self.kl = AdaptiveKL(section.kl_coef, section.kl_target, section.kl_horizon)
        self.generator = torch.Generator().manual_seed(seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        model.eval()

    def state_dict(self) -> dict[str, Any]:
        from smalto.train.resume import generator_state

        return {"kl_coef": self.kl.value, "minibatch_generator": generator_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from smalto.train.resume import set_generator_state

        self.kl.value = float(state["kl_coef"])
        set_generator_state(self.generator, state["minibatch_generator"])

    def rollouts(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        s = self.section
        return sample(
            self.model.policy,
            prompts,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            eos_token_id=self.eos_id,
            seed=seed,
        )

    def evaluate(self, prompts: list[list[int]], seed: int) -> tuple[float, list[list[int]]]:
        responses = self.rollouts(prompts, seed)
        return float(self.score(prompts, responses).float().mean()), responses

    def step(self, prompts: list[list[int]], seed: int) -> dict[str, float]:
        start = time.perf_counter()
        responses = self.rollouts(prompts, seed)
        _sync(self.dev)
        generated = time.perf_counter()
        scores = self.score(prompts, responses).to(self.dev)
        ids, positions, targets, mask = (t.to(self.dev) for t in layout(prompts, responses, self.pad_id))
        exp, stats = experience(
            self.model,
            self.reference,
            self.ref_model,
            ids,
            positions,
            targets,
            mask,
            scores,
            self.section,
            self.kl.value,
            self.autocast,
        )
        self.model.train()
        stats.update(
            ppo_update(
                self.model,
                self.optimizer,
                exp,
                self.section,
                autocast=self.autocast,
                generator=self.generator,
                params=self.params,
            )
        )
        self.model.eval()
        stats["ppo/kl_coef"] = self.kl.value
        self.kl.update(stats["rollout/kl"], len(prompts))
        _sync(self.dev)
        end = time.perf_counter()
        stats.update(
            {
                "time/step_s": end - start,
                "time/generation_s": generated - start,
                "time/generation_share": (generated - start) / (end - start),
                "time/training_share": (end - generated) / (end - start),
                "throughput/rollout_tokens_per_s": sum(len(r) for r in responses) / (generated - start),
            }
        )
        return stats


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
