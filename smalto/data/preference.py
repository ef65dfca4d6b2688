"""Preference pairs in TRL's format → token rows for DPO: the chosen and the rejected sequence of each pair.

Rows are read from JSONL / JSON / Parquet / CSV files, folders of them or saved HF datasets (smalto.data.preprocess).
A row is one of TRL's preference formats:
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: the prompt holds the
                    earlier turns, chosen / rejected the assistant's answer(s); rendered with the tokenizer's chat
                    template (ChatML when it has none)
    implicit prompt {"chosen": [messages], "rejected": [messages]}: the prompt is their longest common prefix of
                    messages (TRL's `extract_prompt`)
Tokenization follows TRL's DPOTrainer: a standard row's chosen / rejected get EOS when they do not end with it; the
prompt and prompt + completion are tokenized (conversations: the prompt with the generation prompt), and the
completion is what follows their longest common prefix of token ids.
Truncation: `max_prompt_length` keeps the prompt's last tokens, `max_completion_length` a completion's first, then
each sequence is cut to `max_length` keeping its start (`truncation_mode: keep_start`, TRL's default; a pair whose
prompt alone fills max_length is dropped and counted) or its end (`keep_end`).
A row is a dict of int64 tensors of `max_length` tokens: chosen_ids, chosen_labels, rejected_ids, rejected_labels
(labels: the token on completion tokens, -100 on the prompt and padding) and `index` (the pair's number).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalto.data.finetune import ROLES, RecipePolicy
from smalto.errors import ConfigError, DataError, check_choice

KEYS = ("prompt", "chosen", "rejected")


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


# ---- reading and validating ----


def _messages(value: Any, field: str) -> str | None:
    """None when `value` is a well-formed message list, else what is wrong with it."""
    if not isinstance(value, list) or not value:
        return f"field {field!r} must be a non-empty list of messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"field {field!r}[{i}] must be an object with a string 'content'"
        if m.get("role") not in ROLES:
            return f"field {field!r}[{i}] has role {m.get('role')!r}; roles are {', '.join(ROLES)}"
    return None


def check_pair(row: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the pair with an explicit prompt, None) or (None, what is wrong with the row, naming the field)."""
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    for key in ("chosen", "rejected"):
        if key not in row:
            return None, f"field {key!r} is missing (fields: {', '.join(map(str, row)) or 'none'})"
    if isinstance(row["chosen"], str) or isinstance(row.get("prompt"), str):
        for key in KEYS:
            if not isinstance(row.get(key), str):
                got = "missing" if key not in row else f"{type(row[key]).__name__}"
                return None, f"field {key!r} must be a string like the other fields (got {got})"
        for key in ("chosen", "rejected"):
            if not row[key].strip():
                return None, f"field {key!r} is empty"
        return {k: row[k] for k in KEYS}, None
    for key in [k for k in KEYS if k in row]:
        if problem := _messages(row[key], key):
            return None, problem
    pair = {k: row[k] for k in KEYS if k in row}
    if "prompt" not in pair:  # TRL's extract_prompt: the longest common prefix of turns
        n = sum(
            1 for _ in takewhile(lambda ab: ab[0] == ab[1], zip(row["chosen"], row["rejected"], strict=False))
        )
        pair = {"prompt": row["chosen"][:n], "chosen": row["chosen"][n:], "rejected": row["rejected"][n:]}
        if not pair["prompt"]:
            return None, "fields 'chosen' and 'rejected' share no leading turns and there is no 'prompt'"
    for key in ("chosen", "rejected"):
        if not pair[key]:
            return None, f"field {key!r} has no turns after the prompt"
        if pair[key][0]["role"] != "assistant":
            return None, f"field {key!r} must start with an assistant message, got {pair[key][0]['role']!r}"
    return pair, None


# ---- tokenizing ----


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    if not getattr(
        tokenizer, "chat_template", None
    ):  # ChatML, as smalto finetune renders chats without a template
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n" if generation_prompt else ""
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja errors, raise_exception in the template
        raise DataError(f"the tokenizer's chat template does not render this conversation ({e})") from None
    return list(out["input_ids"])


def tokenize_pair(pair: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) as TRL's DPOTrainer tokenizes a pair (before truncation)."""
    if isinstance(pair["prompt"], str):
        eos = tokenizer.eos_token
        chosen, rejected = (s if s.endswith(eos) else s + eos for s in (pair["chosen"], pair["rejected"]))
        prompt_ids = list(tokenizer(pair["prompt"])["input_ids"])
        with_chosen = list(tokenizer(pair["prompt"] + chosen)["input_ids"])
        with_rejected = list(tokenizer(pair["prompt"] + rejected)["input_ids"])
    else:
        prompt_ids = _chat_ids(tokenizer, pair["prompt"], True)
        with_chosen = _chat_ids(tokenizer, pair["prompt"] + pair["chosen"], False)
        with_rejected = _chat_ids(tokenizer, pair["prompt"] + pair["rejected"], False)
    n = min(_common(prompt_ids, with_chosen), _common(prompt_ids, with_rejected))
    return prompt_ids[:n], with_chosen[n:], with_rejected[n:]


def _common(a: list[int], b: list[int]) -> int:
    return sum(1 for _ in takewhile(lambda xy: xy[0] == xy[1], zip(a, b, strict=False)))


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
        from smalto.data.preprocess import read_rows

        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; preference completions need one to end")
        self.cfg, self.pad_id = cfg, int(tokenizer.eos_token_id)
        policy = RecipePolicy(cfg.on_error)
        pairs: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]] = []
        dropped = truncated = 0
        for row, where in read_rows(cfg.path, policy):
            pair, problem = check_pair(row)
            if pair is None:
                policy(where, str(problem))
                continue
            try:
                prompt, chosen, rejected = tokenize_pair(pair, tokenizer)
            except DataError as e:
                policy(where, str(e))
                continue
            if cfg.truncation_mode == "keep_start" and len(prompt) >= cfg.max_length:
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
