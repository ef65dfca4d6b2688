"""What gives a PPO rollout its scalar score: a reward model folder, or a rule a program checks.

RULES                      contains:TEXT (1 when the response text has TEXT, else 0), ends_with:TEXT (1 when
                           it ends with TEXT, trailing whitespace ignored), valid_python (1 when prompt +
                           response parses as Python: `ast.parse`, nothing is run)
rule_scorer(spec)          → fn(prompt texts, response texts) → scores (B,)
ModelScorer(folder)        a `smalto reward` folder scoring prompt + response token ids (the policy's
                           tokenizer must be the reward model's)
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from smalto.errors import ConfigError

RULES = ("contains:TEXT", "ends_with:TEXT", "valid_python")
Rule = Callable[[list[str], list[str]], Tensor]


def rule_scorer(spec: str) -> Rule:
    name, sep, arg = spec.partition(":")
    if name in ("contains", "ends_with") and sep and arg:
        if name == "contains":
            return lambda prompts, responses: torch.tensor([float(arg in r) for r in responses])
        return lambda prompts, responses: torch.tensor([float(r.rstrip().endswith(arg)) for r in responses])
    if spec == "valid_python":
        return lambda prompts, responses: torch.tensor(
            [float(_parses(p + r)) for p, r in zip(prompts, responses, strict=True)]
        )
    raise ConfigError(f"reward.rule = {spec!r} is not a rule; choose one of: {', '.join(RULES)}")


def _parses(source: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning on odd escapes in generated text
        try:
            ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return False
    return True


class ModelScorer:
    """Scores (B,) of prompt + response rows, right-padded with the reward model's pad token."""

    def __init__(self, folder: str, device: torch.device, dtype: str | None, vocab_size: int):
        from smalto.hf.reward import load_reward_model

        self.model = load_reward_model(folder, device=device, dtype=dtype)
        self.model.requires_grad_(False)
        if self.model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"reward model {folder} has a vocabulary of {self.model.config.vocab_size} tokens, the policy "
                f"{vocab_size}: they must share a tokenizer"
            )
        pad = self.model.pad_token_id
        self.pad = 0 if pad is None else pad

    @torch.no_grad()
    def __call__(self, rows: list[list[int]]) -> Tensor:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        cuda = self.model.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            return self.model(ids.to(self.model.device)).float()
