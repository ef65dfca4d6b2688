"""Choosing the next token from logits, on the device: the sampling parameters, the logits filters and the draw.

Repetition penalty → temperature → top-k → top-p → min-p, with the order and semantics of transformers' logits
processors (tests/test_generate.py compares them), then a Gumbel-max draw that needs no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from smalto.errors import ConfigError


@dataclass
class SamplingParams:
    """temperature 0 means greedy; None / 0 / 1.0 switch a filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature = {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k = {self.top_k} must be >= 0 (0 or None = off)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p = {self.top_p} must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p = {self.min_p} must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty = {self.repetition_penalty} must be > 0 (1.0 = off)")


def filter_logits(logits: Tensor, p: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """Float logits (B, V) → the logits to sample from: repetition penalty, temperature, then top-k, top-p and
    min-p set the dropped tokens to -inf (the order and semantics of transformers' logits processors).
    `seen` (B, V) bool marks the tokens the repetition penalty applies to (positive logits divided, negative
    multiplied). With temperature 0 only the penalty applies."""
    if seen is not None and p.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (
            probs.cumsum(dim=-1) - probs >= p.top_p
        )  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(
            torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf")
        )
    if p.min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def sample(
    logits: Tensor, p: SamplingParams, seen: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Next token per row (B,) from float logits (B, V), on the device, without a host sync."""
    logits = filter_logits(logits, p, seen)
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    # Gumbel-max with exponential noise: argmax(probs / E) samples from probs without torch.multinomial's sync
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)
