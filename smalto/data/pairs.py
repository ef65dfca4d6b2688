"""Preference pairs in TRL's format, as token ids: what the reward model (and preference tuning) reads.

A row holds `chosen` and `rejected` and usually a `prompt` (TRL's "explicit prompt"); each is either a string
(standard) or a list of chat messages {"role", "content"} (conversational: rendered with the tokenizer's chat
template, else ChatML). Without `prompt`, the longest common start of chosen and rejected is the prompt (TRL's
`extract_prompt`: whole messages for chats, text up to the last shared space for strings).

    read_pairs(path, tokenizer, max_length=..)  → list[PreferencePair] (prompt / chosen / rejected token ids)
Prompt and completions are tokenized separately and joined, so that every pair of a prompt shares its prompt
tokens; EOS ends each completion (added when missing). A pair longer than `max_length` is dropped (TRL does the
same) and counted; a row without its fields, or with an empty completion, is a `DataError` naming file, line and
field. Files: whatever smalto.data.preprocess reads (JSONL, JSON, Parquet, CSV, folders, saved HF datasets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smalto.data.preprocess import read_rows
from smalto.errors import DataError
from smalto.tokenizer import apply_chat_template

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]  # the completions, each ending with EOS
    rejected: list[int]
    where: str  # file:line


@dataclass
class PairsRead:
    pairs: list[PreferencePair]
    too_long: int  # dropped: prompt + the longer completion over max_length


def read_pairs(path: str, tokenizer: Any, *, max_length: int) -> PairsRead:
    def bad(where: str, problem: str) -> None:
        raise DataError(f"{where}: {problem}")

    pairs, too_long = [], 0
    for row, where in read_rows(path, bad):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a preference row must be an object with {', '.join(FIELDS)}")
        prompt, chosen, rejected = split_row(row, where, tokenizer)
        p = list(tokenizer.encode(prompt)) if prompt else []
        c, r = _completion(tokenizer, chosen), _completion(tokenizer, rejected)
        if len(p) + max(len(c), len(r)) > max_length:
            too_long += 1
            continue
        pairs.append(PreferencePair(prompt=p, chosen=c, rejected=r, where=where))
    if not pairs:
        why = f" ({too_long} longer than max_length {max_length})" if too_long else ""
        raise DataError(f"preference data {path} holds no usable pair{why}")
    return PairsRead(pairs=pairs, too_long=too_long)


def split_row(row: dict[str, Any], where: str, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt text, chosen completion text, rejected completion text) of one row."""
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(
                f"{where}: field {key!r} is missing (fields: {', '.join(map(str, row)) or 'none'})"
            )
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if all(isinstance(x, str) for x in (chosen, rejected)) and (prompt is None or isinstance(prompt, str)):
        if prompt is None:
            prompt, chosen, rejected = _common_text(chosen, rejected)
        return prompt, _nonempty(chosen, "chosen", where), _nonempty(rejected, "rejected", where)
    if all(isinstance(x, list) for x in (chosen, rejected)) and (prompt is None or isinstance(prompt, list)):
        if prompt is None:
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        try:
            head = apply_chat_template(tokenizer, prompt, add_generation_prompt=True) if prompt else ""
            out = [head]
            for key, msgs in (("chosen", chosen), ("rejected", rejected)):
                if not msgs:
                    raise DataError(f"{where}: field {key!r} holds no message")
                full = apply_chat_template(tokenizer, prompt + msgs, add_generation_prompt=False)
                if not full.startswith(head):
                    raise DataError(
                        f"{where}: the chat template renders the prompt differently on its own; field {key!r} "
                        "cannot be cut from it"
                    )
                out.append(_nonempty(full[len(head) :], key, where))
        except DataError as e:
            raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        return out[0], out[1], out[2]
    kinds = {k: type(row.get(k)).__name__ for k in FIELDS}
    raise DataError(
        f"{where}: prompt, chosen and rejected must all be strings or all lists of chat messages, got {kinds}"
    )


def _common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while (
        n > 0 and not chosen[n - 1].isspace()
    ):  # cut at a word boundary: a word is not split between the two
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _nonempty(text: str, key: str, where: str) -> str:
    if not text.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return text


def _completion(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids
