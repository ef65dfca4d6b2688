"""ChatML recipes make `<|im_start|>` / `<|im_end|>` single special tokens, with MPT-7B-Chat's ids (50277, 50278)
on the GPT-NeoX tokenizer: in the training examples, the exported tokenizer and generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from smalto.data.templates import CHATML_TEMPLATE
from smalto.tokenizer import add_chatml_tokens, load_tokenizer
from tests.helpers import tiny_config

TURN = "<|im_start|>user\nhi<|im_end|>\n"


def test_neox_placeholders_become_the_chatml_tokens(neox_tokenizer_dir):
    tok = load_tokenizer(neox_tokenizer_dir)
    before = tok(TURN, add_special_tokens=False)["input_ids"]
    assert len(before) == 16  # the markers as text: 7 tokens each
    assert add_chatml_tokens(tok, 50432)
    assert len(tok) == 50432  # [PAD50277] and [PAD50278] gave their ids up
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [50277, 50278]
    assert tok(TURN, add_special_tokens=False)["input_ids"] == [50277, 4537, 187, 5801, 50278, 187]
    assert tok.decode([50277, 4537, 50278], skip_special_tokens=True) == "user"
    assert add_chatml_tokens(tok, 50432)  # a second call changes nothing
    assert len(tok) == 50432


def test_a_tokenizer_without_placeholders_grows_only_within_the_vocab(tiny_data):
    tok = load_tokenizer(tiny_data["tokenizer"])
    n = len(tok)
    assert not add_chatml_tokens(tok, n + 1)  # room for one marker only: neither is added
    assert len(tok) == n
    assert add_chatml_tokens(tok, n + 2)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [n, n + 1]


@pytest.fixture(scope="module")
def chat_run(neox_tokenizer_dir, tmp_path_factory):
    from smalto.finetune import finetune
    from smalto.hf.save import save_pretrained
    from smalto.model.mpt import MPTForCausalLM

    tmp = tmp_path_factory.mktemp("chatml")
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50432, max_seq_len=64, no_bias=True, attn_config={"alibi": True})
    save_pretrained(
        MPTForCausalLM(cfg).eval(), str(tmp / "base"), tokenizer=load_tokenizer(neox_tokenizer_dir)
    )
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
        for w in ["red", "blue", "green", "gold"] * 5
    ]
    (tmp / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "chat",
        "run_dir": str(tmp / "run"),
        "base_model": str(tmp / "base"),
        "data": {"sources": [{"path": str(tmp / "chats.jsonl"), "preprocessing": "chat"}], "seq_len": 64},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"max_duration": "2ba", "global_batch_size": 4, "device": "cpu", "precision": "fp32"},
        "finetune": {"samples": 1, "sample_tokens": 4},
        "logging": {"progress": False, "tensorboard": False},
    }
    (tmp / "chat.yaml").write_text(yaml.safe_dump(recipe))
    return finetune(str(tmp / "chat.yaml")), tmp


def test_chat_recipe_trains_and_exports_the_chatml_tokens(chat_run):
    from transformers import AutoTokenizer

    from smalto.data.finetune_stream import read_sources
    from smalto.finetune import load_finetune_config
    from smalto.train.finetune import finetune_tokenizer

    result, tmp = chat_run
    cfg = load_finetune_config(str(tmp / "chat.yaml"))
    train, _ = read_sources(cfg.data, finetune_tokenizer(cfg))
    ids, labels = train[0][1].examples[0]
    # <|im_start|>user\nSay red.<|im_end|>\n<|im_start|>assistant\n then the target: red!<|im_end|>\n
    assert ids[0] == 50277 and list(ids).count(50277) == 2 and list(ids).count(50278) == 2
    assert ids[list(labels != -100).index(True) - 1] == 187  # "\n" after "assistant": the target starts there
    assert 50278 in set(labels.tolist())  # the assistant's <|im_end|> is learned
    folder = Path(result.train.hf_folder)
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [50277, 50278]
    assert hf(TURN, add_special_tokens=False)["input_ids"] == [50277, 4537, 187, 5801, 50278, 187]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    text = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert hf(text, add_special_tokens=False)["input_ids"] == [
        50277,
        4537,
        187,
        5801,
        50278,
        187,
        50277,
        515,
        5567,
        187,
    ]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [0, 50278]
