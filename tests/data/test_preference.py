"""Preference pairs → token rows: TRL's tokenization and truncation (literal GPT-NeoX ids, and TRL's own
_prepare_dataset and DataCollatorForPreference), the prompt's label mask, and bad rows named by file, line, field."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smalto.data.pairs import check_pair, tokenize_pair
from smalto.data.preference import preference_dataset, truncate
from smalto.data.templates import CHATML_TEMPLATE
from smalto.errors import DataError


@pytest.fixture(scope="module")
def tok(neox_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(neox_tokenizer_dir)


def write(tmp: Path, rows: list, name: str = "p.jsonl") -> Path:
    path = tmp / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_standard_pair_ids_and_the_prompt_is_masked(tok, tmp_path):
    # GPT-NeoX: "Hello" 12092, " world" 1533, " there" 627, <|endoftext|> 0 (EOS appended, as TRL does)
    data = preference_dataset(write(tmp_path, [{"prompt": "Hello", "chosen": " world", "rejected": " there"}]), tok,
                              max_length=5)  # fmt: skip
    row = data[0]
    assert row["chosen_ids"].tolist() == [12092, 1533, 0, 0, 0]  # padded with EOS on the right
    assert row["chosen_labels"].tolist() == [-100, 1533, 0, -100, -100]
    assert row["rejected_ids"].tolist() == [12092, 627, 0, 0, 0]
    assert row["rejected_labels"].tolist() == [-100, 627, 0, -100, -100]
    assert int(row["index"]) == 0


def test_conversation_without_a_template_is_chatml(tok, tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No!"}],
    }
    prompt, chosen, rejected = tokenize_pair(check_pair(row)[0], tok)
    assert tok.decode(prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(chosen) == "Yes.<|im_end|>\n"
    assert tok.decode(rejected) == "No!<|im_end|>\n"
    # implicit prompt: the common leading turns of chosen and rejected
    implicit = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    assert tokenize_pair(check_pair(implicit)[0], tok) == (prompt, chosen, rejected)


ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a city in Europe, I think."},
    {"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "    pass\n"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "It is four, as everyone knows."}],
    },
]


@pytest.mark.parametrize("mode,max_length", [("keep_start", 64), ("keep_start", 9), ("keep_end", 9)])
def test_ids_and_masks_equal_trls(tok, tmp_path, mode, max_length):
    pytest.importorskip("trl")  # in the dev extra
    from datasets import Dataset
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = CHATML_TEMPLATE  # both render the conversation through apply_chat_template
    for i, row in enumerate(ROWS):
        fake = SimpleNamespace(_tokenizer=tok)
        args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=mode)
        trl_rows = DPOTrainer._prepare_dataset(fake, Dataset.from_list([row]), tok, args, "train")
        path = write(tmp_path, [row], f"r{i}.jsonl")
        if len(trl_rows) == 0:  # TRL drops a pair whose prompt fills max_length (keep_start); so do we
            with pytest.raises(DataError, match="no preference pairs"):
                preference_dataset(path, tok, max_length=max_length, truncation_mode=mode)
            continue
        ours = preference_dataset(path, tok, max_length=max_length, truncation_mode=mode)[0]
        t = trl_rows[0]
        assert tokenize_pair(check_pair(row)[0], tok) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
        batch = DataCollatorForPreference(pad_token_id=tok.eos_token_id, max_length=max_length,
                                          truncation_mode=mode)([t])  # fmt: skip
        for k, name in enumerate(("chosen", "rejected")):
            n = int(batch["attention_mask"][k].sum())
            assert ours[f"{name}_ids"][:n].tolist() == batch["input_ids"][k][:n].tolist()
            expected = batch["input_ids"][k].masked_fill(batch["completion_mask"][k] == 0, -100)[:n]
            assert ours[f"{name}_labels"][:n].tolist() == expected.tolist()
            assert (ours[f"{name}_labels"][n:] == -100).all()


def test_max_prompt_and_completion_lengths_cut_like_trl_0x():
    from smalto.data.preference import PreferenceConfig

    cfg = PreferenceConfig(path="", max_length=6, max_prompt_length=2, max_completion_length=3)
    assert truncate([1, 2, 3, 4], [5, 6, 7, 8], cfg) == ([3, 4, 5, 6, 7], [-100, -100, 5, 6, 7])


def test_bad_rows_are_named_by_file_line_and_field(tok, tmp_path):
    good = {"prompt": "a", "chosen": " b", "rejected": " c"}
    cases = [
        ({"prompt": "a", "chosen": " b"}, "field 'rejected' is missing"),
        ({"prompt": "a", "chosen": " b", "rejected": 3}, "field 'rejected' must be a string"),
        ({"prompt": "a", "chosen": "  ", "rejected": " c"}, "field 'chosen' is empty"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]},
         "fields .chosen. and .rejected. share no leading turns"),
        ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "bot", "content": "y"}],
          "rejected": [{"role": "assistant", "content": "z"}]}, r"field 'chosen'\[0\] has role 'bot'"),
        ("{not json", "not valid JSON"),
    ]  # fmt: skip
    for bad, message in cases:
        path = write(tmp_path, [good, bad, good])
        with pytest.raises(DataError, match=rf"p\.jsonl:2: {message}.*on_error: skip"):
            preference_dataset(path, tok, max_length=16)
    data = preference_dataset(write(tmp_path, [good, cases[0][0], cases[1][0], good]), tok, max_length=16,
                              on_error="skip")  # fmt: skip
    assert len(data) == 2 and data.stats["skipped_bad"] == 2


def test_reference_log_probs_ride_with_the_rows(tok, tmp_path):
    data = preference_dataset(write(tmp_path, [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2), tok,
                              max_length=8)  # fmt: skip
    data.ref_logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    assert data[1]["ref_chosen_logps"].item() == -3.0 and data[1]["ref_rejected_logps"].item() == -4.0


def test_a_long_prompt_cut_by_max_prompt_length_keeps_its_pair(tok, tmp_path):
    """A prompt longer than max_length is cut to max_prompt_length first: the pair stays (with its completion
    tokens), as the recipe's max_length 1024 / max_prompt_length 512 must keep long-prompt pairs."""
    long = {"prompt": "word " * 40, "chosen": " yes", "rejected": " no"}
    data = preference_dataset(write(tmp_path, [long]), tok, max_length=32, max_prompt_length=8)
    assert data.stats["dropped_prompt_too_long"] == 0 and len(data) == 1
    row = data[0]
    assert (row["chosen_labels"] != -100).sum() >= 1 and (row["rejected_labels"] != -100).sum() >= 1
    with pytest.raises(
        DataError, match="no preference pairs"
    ):  # without it, the prompt alone fills max_length
        preference_dataset(write(tmp_path, [long]), tok, max_length=32)
