"""Tokenizers: load any HF tokenizer folder or bare `tokenizer.json` offline, and format chats.

MPT models use the GPT-NeoX-20B BPE tokenizer. Chat prompts use the tokenizer's own chat template when it has one,
else ChatML, the format of MPT-7B-Chat / MPT-30B-Chat:
    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smalto.errors import DataError

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def load_tokenizer(path: str | Path) -> Any:
    """A transformers fast tokenizer from a folder (tokenizer.json / tokenizer_config.json ...) or a tokenizer.json.

    Never touches the network: a name that is not a local path is refused.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file():
        if p.suffix != ".json":
            raise DataError(
                f"tokenizer file {p} is not a tokenizer.json; pass it or the folder that holds it"
            )
        return _read_tokenizer_json(p)
    if not p.is_dir():
        raise DataError(
            f"tokenizer {path} does not exist; pass a folder with tokenizer.json or the file itself"
        )
    try:
        # trust_remote_code=False: a folder whose config.json names remote code (smalto_mpt) would otherwise ask
        # "run the custom code? [y/N]" on stdin, eating a piped chat's first line; its tokenizer.json is read below
        with _transformers_errors_only():  # not "a model of type smalto_mpt": only the tokenizer is read here
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        return quiet_length_warning(tok)
    except Exception as auto_error:
        if (p / "tokenizer.json").is_file():  # e.g. a tokenizer_class this transformers version lacks
            return _read_tokenizer_json(p / "tokenizer.json")
        raise DataError(f"cannot load a tokenizer from {p} ({auto_error})") from None


def _read_tokenizer_json(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    try:
        return quiet_length_warning(PreTrainedTokenizerFast(tokenizer_file=str(path)))
    except Exception as e:  # the tokenizers library raises a bare Exception for a corrupt file
        raise DataError(
            f"cannot read tokenizer file {path} ({e}); replace it with a valid tokenizer.json"
        ) from None


@contextmanager
def _transformers_errors_only() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def quiet_length_warning(tokenizer: Any) -> Any:
    """`tokenizer` without transformers' "Token indices sequence length is longer than the specified maximum"
    warning: smalto windows, truncates or refuses long inputs itself (data, generate, chat, eval), so encoding a
    long text is not a mistake. The warning is keyed in `deprecation_warnings`, the flag transformers sets
    after warning once."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


@functools.lru_cache(maxsize=8)  # asked once per example
def leading_special_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids the tokenizer puts before a text by default (`tokenizer(text)`, special tokens added): LLaMA's
    BOS; none for GPT-NeoX (MPT), whose tokenizer adds nothing."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return tuple(full[:i])
    return ()


def encode_rendered_chat(tokenizer: Any, text: str) -> list[int]:
    """The ids of a chat `apply_chat_template` rendered: with the tokenizer's own template no special token is
    added (the template writes the BOS it wants, as transformers' apply_chat_template(tokenize=True) encodes);
    the ChatML fallback is encoded as any text (LLaMA's BOS first)."""
    return list(tokenizer.encode(text, add_special_tokens=not has_chat_template(tokenizer)))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The prompt text for `messages` ([{'role': ..., 'content': ...}]): the tokenizer's template, else ChatML."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"chat message {m!r} needs 'role' and 'content'")
    if tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def add_chatml_tokens(tokenizer: Any, vocab_size: int) -> bool:
    """Make `<|im_start|>` and `<|im_end|>` special tokens of `tokenizer` (in place), as MPT-7B-Chat's tokenizer
    has them: ids 50277 and 50278, right after GPT-NeoX-20B's 50277 tokens. A tokenizer padded to the model's
    vocabulary with placeholders (`[PAD50277]` … `[PAD50431]`) gives up its first placeholders; otherwise the
    tokens are added at the end when their ids fit a model of `vocab_size` rows. Returns whether both are single
    tokens now."""
    import json
    import re

    from tokenizers import AddedToken, Tokenizer

    markers = (CHATML_START, CHATML_END)
    missing = [t for t in markers if t not in tokenizer.get_vocab()]
    if not missing:
        return True
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    placeholders = [
        a for a in backend["added_tokens"] if not a["special"] and re.fullmatch(r"\[PAD\d+\]", a["content"])
    ]
    if len(placeholders) >= len(missing):
        vocab = backend["model"].get("vocab")
        for a, token in zip(sorted(placeholders, key=lambda a: a["id"]), missing, strict=False):
            if isinstance(vocab, dict) and vocab.get(a["content"]) == a["id"]:
                vocab[token] = vocab.pop(a["content"])
            a["content"], a["special"] = token, True
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(backend))
    elif len(tokenizer) + len(missing) <= vocab_size:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in markers)


def chat_stop_strings(tokenizer: Any) -> list[str]:
    """Strings that end an assistant turn: ChatML's end marker unless the tokenizer's template uses its EOS only."""
    if (
        tokenizer is not None
        and has_chat_template(tokenizer)
        and CHATML_END not in str(tokenizer.chat_template)
    ):
        return []
    return [CHATML_END]
