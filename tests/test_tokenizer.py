"""Tokenizer loading (offline) against the reference GPT-NeoX-20B tokenizations, and chat formatting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smalto.errors import DataError
from smalto.tokenizer import apply_chat_template, chat_stop_strings, load_tokenizer


def references(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (folder / "reference_tokenizations.jsonl").read_text().splitlines()
        if line
    ]


@pytest.mark.parametrize("what", ["folder", "tokenizer.json"])
def test_reference_tokenizations(neox_tokenizer_dir: Path, what: str) -> None:
    tok = load_tokenizer(neox_tokenizer_dir if what == "folder" else neox_tokenizer_dir / "tokenizer.json")
    refs = references(neox_tokenizer_dir)
    assert len(refs) == 46
    for ref in refs:
        assert tok.encode(ref["text"], add_special_tokens=False) == ref["ids"], ref["text"]
        assert tok.encode(ref["text"]) == ref["ids"]  # MPT's tokenizer adds no BOS/EOS
    if what == "folder":
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0


def test_chatml_when_the_tokenizer_has_no_template(neox_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    text = apply_chat_template(tok, messages)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(tok, messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    assert chat_stop_strings(tok) == ["<|im_end|>"]
    with pytest.raises(DataError, match="role"):
        apply_chat_template(tok, [{"content": "x"}])


def test_the_tokenizers_own_template_wins(neox_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(neox_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    text = apply_chat_template(tok, [{"role": "user", "content": "Hi"}])
    assert text == "[user] Hi\n[assistant] "
    assert chat_stop_strings(tok) == []


def test_bad_paths_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"not a tokenizer\.json"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
