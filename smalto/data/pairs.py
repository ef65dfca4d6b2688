"""Preference pairs in TRL's format: the one reader of `smalto dpo`, `smalto reward` and `smalto ppo`'s prompts.

Rows are read from JSONL / JSON / Parquet / CSV files, folders of them or saved HF datasets (smalto.data.preprocess).
A row is one of TRL's preference formats (a null field counts as missing, as Parquet and CSV columns hold them):
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: the prompt holds the
                    earlier turns, chosen / rejected the assistant's answer(s); rendered with the tokenizer's chat
                    template (ChatML when it has none, as `smalto finetune` renders chats)
    implicit prompt {"chosen": ..., "rejected": ...}: the prompt is their common start (TRL's `extract_prompt`:
                    whole messages for chats; for strings the text up to the last shared whitespace, so no word is
                    split between prompt and completion)
A bad row is named by file, line and field.

    pair_rows(path, on_bad)          (pair with an explicit prompt, "file:line") for every good row; on_bad(where,
                                     problem) hears the others
    check_pair(row)                  (pair, None) or (None, what is wrong with the row, naming the field)
    tokenize_pair(pair, tokenizer)   DPO's ids, as TRL's DPOTrainer tokenizes (smalto.data.preference)
    read_pairs(path, tokenizer, max_length=..)  the reward model's pairs (PreferencePair)
    read_prompts(path, tokenizer, max_tokens=..) PPO's prompts
DPO follows TRL's DPOTrainer: a standard row's completions get EOS (as text) when they lack it, the prompt and prompt
+ completion are tokenized whole, and the completion is what follows their longest common prefix of ids. The reward
model tokenizes the prompt (`prompt_ids`, as PPO does) and each completion (the text after the rendered prompt)
separately, so every pair of a prompt shares its prompt tokens and the score is read at the EOS that ends each
completion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import takewhile
from typing import Any

from smalto.data.finetune import ROLES
from smalto.data.preprocess import read_rows
from smalto.errors import DataError
from smalto.tokenizer import apply_chat_template

KEYS = ("prompt", "chosen", "rejected")


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
        return None, f"expected a JSON object with {', '.join(KEYS)}, got {type(row).__name__}"
    fields = {k: row[k] for k in KEYS if row.get(k) is not None}
    for key in ("chosen", "rejected"):
        if key not in fields:
            return None, f"field {key!r} is missing (fields: {', '.join(map(str, row)) or 'none'})"
    if isinstance(fields["chosen"], str) or isinstance(fields.get("prompt"), str):
        return _check_texts(fields)
    for key, value in fields.items():
        if problem := _messages(value, key):
            return None, problem
    pair = fields
    if "prompt" not in pair:  # TRL's extract_prompt: the longest common prefix of turns
        n = _common(pair["chosen"], pair["rejected"])
        pair = {"prompt": pair["chosen"][:n], "chosen": pair["chosen"][n:], "rejected": pair["rejected"][n:]}
        if not pair["prompt"]:
            return None, "fields 'chosen' and 'rejected' share no leading turns and there is no 'prompt'"
    for key in ("chosen", "rejected"):
        if not pair[key]:
            return None, f"field {key!r} has no turns after the prompt"
        if pair[key][0]["role"] != "assistant":
            return None, f"field {key!r} must start with an assistant message, got {pair[key][0]['role']!r}"
    return pair, None


def _check_texts(fields: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    for key in KEYS:
        if key in fields and not isinstance(fields[key], str):
            return None, (
                f"field {key!r} must be a string like the other fields (got {type(fields[key]).__name__}): "
                "prompt, chosen and rejected must all be strings or all lists of chat messages"
            )
    chosen, rejected = fields["chosen"], fields["rejected"]
    if "prompt" in fields:
        pair = dict(fields)
    else:  # the shared start, cut at a whitespace so that no word is split between prompt and completion
        n = _common(chosen, rejected)
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        pair = {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    for key in ("chosen", "rejected"):
        if not pair[key].strip():
            return None, f"field {key!r} is empty"
    return pair, None


def _common(a: Any, b: Any) -> int:
    """The length of the longest common prefix of two sequences (ids, characters, messages)."""
    return sum(1 for _ in takewhile(lambda xy: xy[0] == xy[1], zip(a, b, strict=False)))


def pair_rows(path: str, on_bad: Callable[[str, str], None]) -> Iterator[tuple[dict[str, Any], str]]:
    """(pair with an explicit prompt, "file:line") of every good row of `path`; bad rows go to on_bad."""
    for row, where in read_rows(path, on_bad):
        pair, problem = check_pair(row)
        if pair is None:
            on_bad(where, str(problem))
            continue
        yield pair, where


def _raise(where: str, problem: str) -> None:
    raise DataError(f"{where}: {problem}")


# ---- rendering and tokenizing ----


def render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    """The chat template's text for `messages` (ChatML when the tokenizer has no template)."""
    try:
        return apply_chat_template(tokenizer, messages, add_generation_prompt=generation_prompt)
    except DataError:
        raise
    except Exception as e:  # jinja errors, raise_exception in the template
        raise DataError(f"the tokenizer's chat template does not render this conversation ({e})") from None


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    # what tokenizer.apply_chat_template(tokenize=True) returns: the text, no special tokens added
    text = render(tokenizer, messages, generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[int]:
    """A prompt's ids as the policy sees it before a response: a string as the tokenizer encodes a text (LLaMA's
    BOS first), a chat as its template renders it with the generation prompt, no special tokens added (what
    transformers' apply_chat_template(tokenize=True) gives: the template writes a BOS it wants)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt)) if prompt else []
    text = render(tokenizer, prompt, True)
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _completions(pair: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """The text of the chosen and the rejected completion: for chats, what follows the rendered prompt."""
    if isinstance(pair["prompt"], str):
        return pair["chosen"], pair["rejected"]
    head = render(tokenizer, pair["prompt"], True)
    out = []
    for key in ("chosen", "rejected"):
        full = render(tokenizer, pair["prompt"] + pair[key], False)
        if not full.startswith(head):
            raise DataError(
                f"the chat template renders the prompt differently on its own; field {key!r} cannot be cut from it"
            )
        if not full[len(head) :].strip():
            raise DataError(f"field {key!r} is empty")
        out.append(full[len(head) :])
    return out[0], out[1]


def _completion_ids(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


# ---- the reward model's pairs and PPO's prompts ----


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
    """The reward model's pairs of `path`; a pair longer than `max_length` is dropped (as TRL does) and counted."""
    pairs, too_long = [], 0
    for pair, where in pair_rows(path, _raise):
        try:
            chosen, rejected = _completions(pair, tokenizer)
            p = prompt_ids(tokenizer, pair["prompt"])
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        c, r = _completion_ids(tokenizer, chosen), _completion_ids(tokenizer, rejected)
        if len(p) + max(len(c), len(r)) > max_length:
            too_long += 1
            continue
        pairs.append(PreferencePair(prompt=p, chosen=c, rejected=r, where=where))
    if not pairs:
        why = f" ({too_long} longer than max_length {max_length})" if too_long else ""
        raise DataError(f"preference data {path} holds no usable pair{why}")
    return PairsRead(pairs=pairs, too_long=too_long)


def read_prompts(path: str, tokenizer: Any, *, max_tokens: int) -> list[list[int]]:
    """The `prompt` of every row of `path` as ids (`prompt_ids`); prompts over `max_tokens` are left out. Rows may
    be preference pairs or hold a prompt alone."""
    out = []
    for row, where in read_rows(path, _raise):
        p = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(p, str | list) or not p:
            raise DataError(f"{where}: field 'prompt' must be a non-empty string or a list of chat messages")
        if isinstance(p, list) and (problem := _messages(p, "prompt")):
            raise DataError(f"{where}: {problem}")
        try:
            ids = prompt_ids(tokenizer, p)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) <= max_tokens:
            out.append(ids)
    if not out:
        raise DataError(f"prompts {path}: none fits data.max_prompt_tokens ({max_tokens})")
    return out
