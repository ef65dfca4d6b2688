"""Preference pairs → token rows for DPO: the chosen and the rejected sequence of each pair.

Pairs are read, checked and tokenized by smalto.data.pairs (TRL's formats; tokenization as TRL's DPOTrainer: the
completion is what follows the longest common prefix of the prompt's ids and the prompt + completion's ids).
Truncation: `max_prompt_length` keeps the prompt's last tokens, `max_completion_length` a completion's first, then
each sequence is cut to `max_length` keeping its start (`truncation_mode: keep_start`, TRL's default; a pair whose
prompt, cut to max_prompt_length, alone fills max_length is dropped and counted) or its end (`keep_end`).
A row is a dict of int64 tensors of `max_length` tokens: chosen_ids, chosen_labels, rejected_ids, rejected_labels
(labels: the token on completion tokens, -100 on the prompt and padding) and `index` (the pair's number).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalto.data.finetune import RecipePolicy
from smalto.data.pairs import pair_rows, tokenize_pair
from smalto.errors import ConfigError, DataError, check_choice


@dataclass(kw_only=True)
class PreferenceConfig:
    path: str
    max_length: int = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"
    on_error: str = "raise"

    def __post_init__(self) -> None:
        check_choice("data.truncation_mode", self.truncation_mode, ("keep_start", "keep_end"))
        check_choice("data.on_error", self.on_error, ("raise", "skip"))
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {self.max_length}")
        for key in ("max_prompt_length", "max_completion_length"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be positive or null, got {getattr(self, key)}")


def truncate(prompt: list[int], completion: list[int], cfg: PreferenceConfig) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + completion after TRL's truncation; labels are -100 on the prompt."""
    if cfg.max_prompt_length is not None:
        prompt = prompt[-cfg.max_prompt_length :]
    if cfg.max_completion_length is not None:
        completion = completion[: cfg.max_completion_length]
    ids, labels = prompt + completion, [-100] * len(prompt) + completion
    cut = slice(None, cfg.max_length) if cfg.truncation_mode == "keep_start" else slice(-cfg.max_length, None)
    return ids[cut], labels[cut]


class PreferenceDataset(torch.utils.data.Dataset):
    """The pairs of one source as rows of `max_length` tokens (module docstring); `stats` counts what was read,
    truncated, dropped and skipped. `ref_logps` (N, 2), once set, adds ref_chosen_logps / ref_rejected_logps."""

    def __init__(self, cfg: PreferenceConfig, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; preference completions need one to end")
        self.cfg, self.pad_id = cfg, int(tokenizer.eos_token_id)
        policy = RecipePolicy(cfg.on_error)
        pairs: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]] = []
        dropped = truncated = 0
        for pair, where in pair_rows(cfg.path, policy):
            try:
                prompt, chosen, rejected = tokenize_pair(pair, tokenizer)
            except DataError as e:
                policy(where, str(e))
                continue
            kept = min(
                len(prompt), cfg.max_prompt_length or len(prompt)
            )  # the prompt after max_prompt_length
            if cfg.truncation_mode == "keep_start" and kept >= cfg.max_length:
                dropped += 1  # no completion token would be left
                continue
            c, r = truncate(prompt, chosen, cfg), truncate(prompt, rejected, cfg)
            truncated += len(c[0]) < len(prompt) + len(chosen) or len(r[0]) < len(prompt) + len(rejected)
            pairs.append((c, r))
        if not pairs:
            raise DataError(
                f"{cfg.path}: no preference pairs (the file is empty, or every row was bad or too long)"
            )
        self.pairs = pairs
        self.ref_logps: torch.Tensor | None = None
        self.stats = {"pairs": len(pairs), "truncated": truncated, "dropped_prompt_too_long": dropped}
        self.stats["skipped_bad"] = policy.skipped

    def __len__(self) -> int:
        return len(self.pairs)

    def split(self, fraction: float, seed: int) -> tuple[PreferenceDataset, PreferenceDataset]:
        """(kept, held out): `fraction` of the pairs (at least one when positive), chosen by `seed`."""
        n = len(self.pairs)
        held = max(1, round(n * fraction)) if fraction > 0 else 0
        if held >= n:
            raise DataError(f"{self.cfg.path}: eval_fraction {fraction} of {n} pairs leaves none to train on")
        order = np.random.default_rng([seed, n]).permutation(n)
        return self._subset(sorted(order[held:])), self._subset(sorted(order[:held]))

    def _subset(self, keep: list[int]) -> PreferenceDataset:
        part = copy.copy(self)
        part.pairs = [self.pairs[i] for i in keep]
        part.stats = {**self.stats, "pairs": len(keep)}
        return part

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row: dict[str, torch.Tensor] = {}
        for name, (ids, labels) in zip(("chosen", "rejected"), self.pairs[i], strict=True):
            t_ids = torch.full((self.cfg.max_length,), self.pad_id, dtype=torch.int64)
            t_labels = torch.full((self.cfg.max_length,), -100, dtype=torch.int64)
            t_ids[: len(ids)], t_labels[: len(labels)] = torch.tensor(ids), torch.tensor(labels)
            row[f"{name}_ids"], row[f"{name}_labels"] = t_ids, t_labels
        row["index"] = torch.tensor(i)
        if self.ref_logps is not None:
            row["ref_chosen_logps"], row["ref_rejected_logps"] = self.ref_logps[i, 0], self.ref_logps[i, 1]
        return row


def preference_dataset(path: str | Path, tokenizer: Any, **options: Any) -> PreferenceDataset:
    """The pairs of a file or folder, tokenized (options: PreferenceConfig's fields)."""
    return PreferenceDataset(PreferenceConfig(path=str(path), **options), tokenizer)
