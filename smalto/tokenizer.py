"""Tokenizers: load any HF tokenizer folder or bare `tokenizer.json` offline, and format chats.

MPT models use the GPT-NeoX-20B BPE tokenizer. Chat prompts use the tokenizer's own chat template when it has one,
else ChatML, the format of MPT-7B-Chat / MPT-30B-Chat:
    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smalto.errors import DataError

CHATML_END = "<|im_end|>"


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
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as auto_error:
        if (p / "tokenizer.json").is_file():  # e.g. a tokenizer_class this transformers version lacks
            return _read_tokenizer_json(p / "tokenizer.json")
        raise DataError(f"cannot load a tokenizer from {p} ({auto_error})") from None


def _read_tokenizer_json(path: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a corrupt file
        raise DataError(
            f"cannot read tokenizer file {path} ({e}); replace it with a valid tokenizer.json"
        ) from None


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


def chat_stop_strings(tokenizer: Any) -> list[str]:
    """Strings that end an assistant turn: ChatML's end marker unless the tokenizer's template uses its EOS only."""
    if (
        tokenizer is not None
        and has_chat_template(tokenizer)
        and CHATML_END not in str(tokenizer.chat_template)
    ):
        return []
    return [CHATML_END]
