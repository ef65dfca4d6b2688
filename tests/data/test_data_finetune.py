"""Finetuning data: loss masks follow the target rules, truncation and packing keep examples intact."""

import json

import numpy as np
import pytest
import torch

from smalto.data.finetune import FinetuneConfig, FinetuneDataset, collate
from smalto.errors import DataError


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
}


def write(tmp_path, records, name="ft.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def targets(hf_tok, row) -> str:
    ids, labels = row["input_ids"], row["labels"]
    keep = labels != -100
    assert (labels[keep] == ids[keep]).all()
    return hf_tok.decode(ids[keep])


def test_prompt_response_masks_prompt(tmp_path, hf_tok):
    ds = FinetuneDataset(
        FinetuneConfig(path=write(tmp_path, [{"prompt": "Q: 2+2?", "response": " A: 4"}]), seq_len=32), hf_tok
    )
    row = ds[0]
    expected = hf_tok("Q: 2+2?")["input_ids"] + hf_tok(" A: 4")["input_ids"] + [hf_tok.eos_token_id]
    assert row["input_ids"][: len(expected)].tolist() == expected
    assert targets(hf_tok, row) == " A: 4" + hf_tok.eos_token
    assert (row["sequence_id"][: len(expected)] == 0).all() and (
        row["sequence_id"][len(expected) :] == -1
    ).all()


def test_chatml_rendering_and_target_rules(tmp_path, hf_tok):
    path = write(tmp_path, [CHAT])
    last = FinetuneDataset(FinetuneConfig(path=path, seq_len=128), hf_tok)[0]
    text = hf_tok.decode(last["input_ids"][last["sequence_id"] == 0])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye.<|im_end|>\n" + hf_tok.eos_token
    )
    assert targets(hf_tok, last) == "Goodbye.<|im_end|>\n" + hf_tok.eos_token
    every = FinetuneDataset(FinetuneConfig(path=path, seq_len=128, target_responses="all"), hf_tok)[0]
    assert targets(hf_tok, every) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n" + hf_tok.eos_token
    both = FinetuneDataset(FinetuneConfig(path=path, seq_len=128, target_prompts="all"), hf_tok)[0]
    assert targets(hf_tok, both) == text


def test_tokenizer_chat_template_is_used(tmp_path, hf_tok):
    import copy

    tok = copy.deepcopy(hf_tok)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    row = FinetuneDataset(FinetuneConfig(path=write(tmp_path, [chat]), seq_len=64), tok)[0]
    assert (
        hf_tok.decode(row["input_ids"][row["sequence_id"] == 0])
        == "[user] Hi\n[assistant] Yo\n" + tok.eos_token
    )
    assert targets(tok, row) == "Yo\n" + tok.eos_token


def test_truncation_cuts_prompt_from_the_left_and_drops_long_responses(tmp_path, hf_tok):
    long_prompt = " ".join(f"w{i}" for i in range(200))
    records = [
        {"prompt": long_prompt, "response": " the end"},
        {"prompt": "short", "response": " ".join(["very long response"] * 100)},
    ]
    cfg = FinetuneConfig(path=write(tmp_path, records), seq_len=48, packing=False)
    ds = FinetuneDataset(cfg, hf_tok)
    assert ds.stats == {"examples": 1, "dropped_too_long": 1, "truncated": 1, "skipped_bad": 0}
    row = ds[0]
    assert (row["sequence_id"] == 0).all()  # fills the row exactly
    full = hf_tok(long_prompt)["input_ids"] + hf_tok(" the end")["input_ids"] + [hf_tok.eos_token_id]
    assert row["input_ids"].tolist() == full[-48:]
    assert targets(hf_tok, row) == " the end" + hf_tok.eos_token
    with pytest.raises(DataError, match=r"ft.jsonl:2: the response has \d+ tokens"):
        FinetuneDataset(FinetuneConfig(path=cfg.path, seq_len=48, too_long="error"), hf_tok)


def test_packing_keeps_examples_whole_and_numbers_them(tmp_path, hf_tok):
    rng = np.random.default_rng(0)
    records = [
        {
            "prompt": f"q{i} " + "x " * int(rng.integers(1, 20)),
            "response": f" a{i}" + " y" * int(rng.integers(1, 20)),
        }
        for i in range(60)
    ]
    path = write(tmp_path, records)
    unpacked = FinetuneDataset(FinetuneConfig(path=path, seq_len=64, packing=False), hf_tok)
    packed = FinetuneDataset(FinetuneConfig(path=path, seq_len=64), hf_tok)
    assert len(packed) < len(unpacked) == 60
    examples = {
        tuple(r["input_ids"][r["sequence_id"] == 0].tolist()): tuple(
            r["labels"][r["sequence_id"] == 0].tolist()
        )
        for r in unpacked
    }
    found = {}
    for row in packed:
        seq = row["sequence_id"]
        assert (seq[seq >= 0].diff() >= 0).all()  # examples are contiguous and numbered in order
        assert (row["labels"][seq == -1] == -100).all()
        for k in range(int(seq.max()) + 1):
            found[tuple(row["input_ids"][seq == k].tolist())] = tuple(row["labels"][seq == k].tolist())
    assert found == examples
    batch = collate([packed[0], packed[1]])
    assert batch["input_ids"].shape == (2, 64) and batch["input_ids"].dtype == torch.int64


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "ft.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}', "ft.jsonl:2: field 'response' must be a string"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "ft.jsonl:2: the last message must be the assistant's",
        ),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "ft.jsonl:2: messages[0] has role 'robot'"),
        ('{"question": "x"}', "ft.jsonl:2: expected keys prompt/response or messages"),
    ],
)
def test_bad_lines_are_named(tmp_path, hf_tok, line, message):
    path = write(tmp_path, [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(DataError) as e:
        FinetuneDataset(FinetuneConfig(path=path, seq_len=32), hf_tok)
    assert message in str(e.value)
    skipped = FinetuneDataset(FinetuneConfig(path=path, seq_len=32, on_error="skip"), hf_tok)
    assert skipped.stats["skipped_bad"] == 1 and skipped.stats["examples"] == 1


def test_undecodable_line_and_empty_file(tmp_path, hf_tok):
    path = tmp_path / "ft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"ft\.jsonl:2: not valid UTF-8"):
        FinetuneDataset(FinetuneConfig(path=str(path), seq_len=32), hf_tok)
    with pytest.raises(DataError, match="no finetuning examples"):
        FinetuneDataset(FinetuneConfig(path=write(tmp_path, [], "empty.jsonl"), seq_len=32), hf_tok)
