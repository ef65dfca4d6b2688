"""Finetuning data: prompt/response pairs or chats → token rows with loss masks, optionally packed.

Rows are read from JSONL / JSON / Parquet / CSV files, folders of them or saved HF datasets, and turned into
examples by the source's `preprocessing` step (smalto.data.preprocess: prompt_response, dolly, alpaca, chat,
module:function). Examples:
    {"prompt": "...", "response": "..."}            rendered as prompt + response + EOS (llm-foundry's way),
                                                    after the tokenizer's leading special tokens (LLaMA's BOS)
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
                                                    rendered with the tokenizer's chat template, or ChatML
                                                    (<|im_start|>role\\n...<|im_end|>\\n) when it has none,
                                                    then EOS; the last message must be the assistant's.
Loss mask: labels are -100 except on targets. `target_responses`: "last" (the final response) or "all"
(every assistant message); a response's target covers its content and end-of-turn marker, not the
role header. `target_prompts`: "none" or "all" (everything else becomes a target too). EOS is a target
with the last response.
Truncation: an example longer than `seq_len` loses tokens from the left (the oldest prompt context). When
the last response alone (with EOS) is longer than `seq_len` it cannot be kept: `too_long` = "drop" (count
it and go on, the default) or "error" (stop, naming file and line).
Packing (`packing=True`): examples fill rows of `seq_len` tokens first-fit in file order; `sequence_id`
numbers the examples in a row (0, 1, ...) so attention stays within each; padding has label -100 and
sequence_id -1. Without packing, one example per row.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalto.data.sources import ErrorPolicy
from smalto.errors import ConfigError, DataError, check_choice, check_keys
from smalto.tokenizer import leading_special_ids

ROLES = ("system", "user", "assistant", "tool")
_MAX_OPEN_ROWS = 64  # first-fit looks at this many partly filled rows; keeps packing linear in time


@dataclass(kw_only=True)
class FinetuneConfig:
    path: str
    seq_len: int = 2048
    target_responses: str = "last"
    target_prompts: str = "none"
    too_long: str = "drop"
    packing: bool = True
    on_error: str = "raise"
    preprocessing: str = "prompt_response"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "data") -> FinetuneConfig:
        check_keys(where, d, [f.name for f in dataclasses.fields(cls)])
        return cls(**d)

    def __post_init__(self) -> None:
        for key, options in (
            ("target_responses", ("last", "all")),
            ("target_prompts", ("none", "all")),
            ("too_long", ("drop", "error")),
            ("on_error", ("raise", "skip")),
        ):
            check_choice(key, getattr(self, key), options)
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")


# ---- reading and validating ----


def _validate(record: Any) -> str | None:
    """None when the record is well-formed, else what is wrong with it."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "field 'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"messages[{i}] must be an object with a string 'content'"
            if m.get("role") not in ROLES:
                return f"messages[{i}] has role {m.get('role')!r}; roles are {', '.join(ROLES)}"
        if msgs[-1]["role"] != "assistant":
            return f"the last message must be the assistant's, got {msgs[-1]['role']!r}"
        return None
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                return f"field {key!r} must be a string"
        if not record["response"].strip():
            return "field 'response' is empty"
        return None
    return f"expected keys prompt/response or messages, got {', '.join(map(str, record)) or 'none'}"


class RecipePolicy(ErrorPolicy):
    """ErrorPolicy whose message names the recipe key that skips bad rows."""

    def __call__(self, where: str, problem: str) -> None:
        if self.mode == "raise":
            raise DataError(f"{where}: {problem} (set data.on_error: skip to count and skip bad rows)")
        super().__call__(where, problem)


def read_records(
    path: str | Path, policy: ErrorPolicy, preprocessing: str = "prompt_response"
) -> list[tuple[dict[str, Any], str]]:
    """Well-formed examples with their "file:line", after the named preprocessing step."""
    from smalto.data.preprocess import RowError, preprocessor, read_rows

    step = preprocessor(preprocessing)
    out = []
    for row, where in read_rows(str(path), policy):
        if not isinstance(row, dict):
            policy(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        try:
            record = step(row)
        except RowError as e:
            policy(where, str(e))
            continue
        except Exception as e:  # a user's module:function failing on a row names the row
            policy(where, f"preprocessing {preprocessing} failed: {type(e).__name__}: {e}")
            continue
        problem = _validate(record)
        if problem:
            policy(where, problem)
            continue
        out.append((record, where))
    if not out:
        raise DataError(f"{path}: no finetuning examples found (the file is empty or every row was bad)")
    return out


# ---- rendering ----


def _pieces(record: dict[str, Any], tokenizer: Any, cfg: FinetuneConfig) -> list[tuple[str, str]]:
    """The example as (text, kind) pieces; kind is "prompt", "response" or "last" (the final response)."""
    if "messages" not in record:
        return [(record["prompt"], "prompt"), (record["response"], "last")]
    msgs = record["messages"]
    last = len(msgs) - 1
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        pieces = []
        for i, m in enumerate(msgs):
            head = f"<|im_start|>{m['role']}\n"
            body = f"{m['content']}<|im_end|>\n"
            if m["role"] == "assistant":
                pieces += [(head, "prompt"), (body, "last" if i == last else "response")]
            else:
                pieces.append((head + body, "prompt"))
        return pieces

    def render(upto: int, gen: bool) -> str:
        if upto == 0:
            return ""  # templates refuse an empty conversation; a leading assistant turn has no header
        try:
            return str(tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen))
        except Exception as e:  # jinja errors, raise_exception in the template
            raise DataError(f"the tokenizer's chat template does not render this chat ({e})") from None

    # Cut the full rendering at the boundaries given by rendering each prefix of the conversation.
    full, pieces, done = render(len(msgs), False), [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            marks = [(render(i, True), "prompt"), (render(i + 1, False), "last" if i == last else "response")]
        else:
            marks = [(render(i + 1, False), "prompt")]
        for text, kind in marks:
            if not text.startswith(done) or not full.startswith(text):
                raise DataError(
                    "the tokenizer's chat template does not render conversations prefix by prefix; it cannot be masked"
                )
            if len(text) > len(done):
                pieces.append((text[len(done) :], kind))
            done = text
    return pieces


def render(record: dict[str, Any], tokenizer: Any, cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(input_ids, labels, length of the final response incl. EOS) before truncation."""
    pieces = _pieces(record, tokenizer, cfg)
    encoded = tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for (_, kind), toks in zip(pieces, encoded, strict=True):
        target = (
            kind == "last"
            or (kind == "response" and cfg.target_responses == "all")
            or (cfg.target_prompts == "all")
        )
        ids += toks
        labels += toks if target else [-100] * len(toks)
    last_len = len(encoded[-1])
    # a prompt/response example starts as the tokenizer starts a text (LLaMA's BOS), as `smalto generate` encodes
    # its prompt and TRL a prompt-completion pair; a chat is what its template renders (BOS when the template
    # writes it), as transformers' apply_chat_template tokenizes it
    lead = list(leading_special_ids(tokenizer)) if "messages" not in record else []
    if lead and ids[: len(lead)] != lead:
        ids, labels = lead + ids, [-100] * len(lead) + labels
    if not ids or ids[-1] != tokenizer.eos_token_id:  # EOS when the rendering does not end with it
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        last_len += 1
    return np.asarray(ids, np.int64), np.asarray(labels, np.int64), last_len


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> list[list[int]]:
    """Rows as lists of example indices, first-fit in order over the last few open rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []
    for i, (ids, _) in enumerate(examples):
        n = len(ids)
        row = next((r for r in open_rows if room[r] >= n), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
            open_rows.append(row)
            if len(open_rows) > _MAX_OPEN_ROWS:
                open_rows.pop(0)
        rows[row].append(i)
        room[row] -= n
    return rows


class FinetuneDataset(torch.utils.data.Dataset):
    """Rows of exactly `seq_len` tokens: dicts of input_ids, labels, sequence_id (int64 tensors).

    `tokenizer` is a transformers tokenizer (or a path AutoTokenizer loads). After construction,
    `stats` says how many examples were read, dropped as too long, truncated and skipped as bad.
    """

    def __init__(self, cfg: FinetuneConfig, tokenizer: Any) -> None:
        if isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; finetuning examples need one to end")
        self.cfg = cfg
        self.pad_id = int(tokenizer.eos_token_id)
        policy = RecipePolicy(cfg.on_error)
        examples: list[tuple[np.ndarray, np.ndarray]] = []
        dropped = truncated = 0
        for record, where in read_records(cfg.path, policy, cfg.preprocessing):
            try:
                ids, labels, last_len = render(record, tokenizer, cfg)
            except DataError as e:
                policy(where, str(e))
                continue
            if last_len > cfg.seq_len:
                if cfg.too_long == "error":
                    raise DataError(
                        f"{where}: the response has {last_len} tokens (with EOS), more than seq_len {cfg.seq_len}; "
                        "raise seq_len or set too_long: drop"
                    )
                dropped += 1
                continue
            if len(ids) > cfg.seq_len:
                truncated += 1
                ids, labels = ids[-cfg.seq_len :], labels[-cfg.seq_len :]
            examples.append((ids, labels))
        if not examples:
            raise DataError(f"{cfg.path}: every example was dropped as longer than seq_len {cfg.seq_len}")
        self.examples = examples
        self.rows = pack(examples, cfg.seq_len) if cfg.packing else [[i] for i in range(len(examples))]
        self.stats = {
            "examples": len(examples),
            "dropped_too_long": dropped,
            "truncated": truncated,
            "skipped_bad": policy.skipped,
        }

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, fraction: float, seed: int) -> tuple[FinetuneDataset, FinetuneDataset]:
        """(kept, held out): `fraction` of the examples (at least one when positive), chosen by `seed`, held out;
        each part packed again."""
        n = len(self.examples)
        held = max(1, round(n * fraction)) if fraction > 0 else 0
        if held >= n:
            raise DataError(
                f"{self.cfg.path}: eval_fraction {fraction} of {n} examples leaves none to train on; lower it"
            )
        order = np.random.default_rng([seed, n]).permutation(n)
        return self._subset(sorted(order[held:])), self._subset(sorted(order[:held]))

    def _subset(self, keep: list[int]) -> FinetuneDataset:
        part = copy.copy(self)
        part.examples = [self.examples[i] for i in keep]
        part.rows = (
            pack(part.examples, self.cfg.seq_len) if self.cfg.packing else [[i] for i in range(len(keep))]
        )
        part.stats = {**self.stats, "examples": len(keep)}
        return part

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        T = self.cfg.seq_len
        ids = np.full(T, self.pad_id, np.int64)
        labels = np.full(T, -100, np.int64)
        seq = np.full(T, -1, np.int64)
        at = 0
        for k, e in enumerate(self.rows[i]):
            e_ids, e_labels = self.examples[e]
            n = len(e_ids)
            ids[at : at + n], labels[at : at + n], seq[at : at + n] = e_ids, e_labels, k
            if (
                k > 0
            ):  # its first token is no target from the example before it (as alone: nothing predicts it)
                labels[at] = -100
            at += n
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "sequence_id": torch.from_numpy(seq),
        }


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch (B, T) for torch's DataLoader."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
