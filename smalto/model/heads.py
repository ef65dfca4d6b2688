"""Scalar heads on the MPT backbone: a sequence score (reward model) and a per-token value (PPO's critic).

    MPTForSequenceScore   backbone → `score` (d_model → 1, no bias) at each row's last non-pad token: the tensors
                          and the token choice of transformers' `MptForSequenceClassification` with num_labels 1
    MPTWithValueHead      a causal LM and `v_head` (d_model → 1, with bias) on its final hidden states: logits and
                          a value per position, as TRL's `AutoModelForCausalLMWithValueHead`
Plain reference modules, like smalto/model/mpt.py: no loading, no training code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM, MPTModel


def last_token_index(input_ids: Tensor, pad_token_id: int | None) -> Tensor:
    """(B, T) → (B,): the rightmost position whose token is not `pad_token_id` (the last position when None).

    transformers' rule for sequence classification, so left and right padding both work; a row that ends with
    the pad token (an EOS used as pad) is scored at the token before it, there as here."""
    B, T = input_ids.shape
    if pad_token_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    keep = (input_ids != pad_token_id).long()
    return (torch.arange(T, device=input_ids.device) * keep).argmax(-1)


class MPTForSequenceScore(nn.Module):
    """A reward model: `forward(input_ids)` → one float score per row (B,), read at `last_token_index`.

    Parameter names (`transformer.*`, `score.weight`) are those of `MptForSequenceClassification`, so the state
    dict is its checkpoint."""

    def __init__(self, config: MPTConfig, pad_token_id: int | None, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.pad_token_id = pad_token_id
        self.transformer = MPTModel(config, device)
        self.score = nn.Linear(config.d_model, 1, bias=False, device=device)

    @classmethod
    def from_causal_lm(cls, lm: MPTForCausalLM, pad_token_id: int | None) -> MPTForSequenceScore:
        """A reward model on `lm`'s backbone (shared, not copied) with a fresh head; the unembedding is dropped."""
        model = cls(lm.config, pad_token_id, device="meta")
        model.transformer = lm.transformer
        model.score = nn.Linear(lm.config.d_model, 1, bias=False, device=lm.device, dtype=lm.dtype)
        nn.init.normal_(model.score.weight, std=1 / math.sqrt(lm.config.d_model + 1))
        return model

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T) → scores (B,) in float32."""
        h = self.transformer(input_ids, attention_mask)  # (B, T, d_model)
        last = last_token_index(input_ids, self.pad_token_id)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(h[rows, last]).squeeze(-1).float()


class MPTWithValueHead(nn.Module):
    """A policy and its critic on one backbone: `forward(input_ids)` → (logits (B, T, V), values (B, T)).

    `policy` stays an `MPTForCausalLM` (the decoder samples from it and it is what gets exported); the value
    head reads the same final hidden states, as TRL's ValueHead (a linear layer with bias)."""

    def __init__(self, policy: MPTForCausalLM):
        super().__init__()
        self.policy = policy
        d = policy.config.d_model
        self.v_head = nn.Linear(d, 1, device=policy.device, dtype=policy.dtype)
        nn.init.normal_(self.v_head.weight, std=1 / math.sqrt(d + 1))
        nn.init.zeros_(self.v_head.bias)

    @property
    def config(self) -> MPTConfig:
        return self.policy.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.policy.transformer(input_ids, attention_mask)  # (B, T, d_model)
        return self.policy.unembed(h), self.v_head(h).squeeze(-1).float()
