"""The reward model: Bradley–Terry on literal numbers, preference rows in TRL's formats, scores equal to
transformers' MptForSequenceClassification on the exported folder, a short run that learns, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smalto.data.pairs import read_pairs
from smalto.errors import CheckpointError, ConfigError, DataError
from smalto.hf.reward import load_reward_model, save_reward_model
from smalto.model.heads import MPTForSequenceScore, last_token_index
from smalto.model.mpt import MPTForCausalLM
from smalto.train.reward import bradley_terry_loss
from tests.helpers import tiny_config
from tests.train.conftest import run_smalto

NATIVE = {"no_bias": True, "attn_config": {"alibi": True, "attn_impl": "sdpa"}}


def test_bradley_terry_loss_literal_numbers():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log σ(1) = 0.31326169, -log σ(-1) = 1.31326169
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(0.81326169, abs=1e-6)
    # margin 0.5: -log σ(0.5) = 0.47407698, -log σ(-1.5) = 1.70141328
    assert bradley_terry_loss(rc, rr, 0.5).item() == pytest.approx(1.08774513, abs=1e-6)
    # centering: + 0.01 · mean(3², 1²) = + 0.05
    assert bradley_terry_loss(rc, rr, center=0.01).item() == pytest.approx(0.86326169, abs=1e-6)


def test_last_token_index_is_the_rightmost_non_pad():
    ids = torch.tensor([[5, 6, 3, 3], [3, 3, 7, 8], [3, 3, 3, 3], [1, 2, 3, 4]])
    assert last_token_index(ids, 3).tolist() == [1, 3, 0, 3]
    assert last_token_index(ids, None).tolist() == [3, 3, 3, 3]


def test_scores_equal_transformers_mpt_for_sequence_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification, MptForSequenceClassification

    torch.manual_seed(0)
    lm = MPTForCausalLM(tiny_config(**NATIVE))
    model = MPTForSequenceScore.from_causal_lm(lm, pad_token_id=3).eval()
    folder = save_reward_model(model, tmp_path / "rm")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["MptForSequenceClassification"] and cfg["pad_token_id"] == 3
    assert cfg["model_type"] == "mpt" and "auto_map" not in cfg
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert isinstance(hf, MptForSequenceClassification) and hf.config.num_labels == 1
    # right padding, no padding, left padding
    ids = torch.tensor([[5, 6, 7, 8, 9, 3, 3], [10, 11, 12, 13, 14, 15, 16], [3, 3, 3, 20, 21, 22, 23]])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != 3).long()).logits.squeeze(-1)
        ours = model(ids, attention_mask=ids != 3)
        reloaded = load_reward_model(folder)(ids, attention_mask=ids != 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded, theirs, rtol=1e-5, atol=1e-5)
    assert len(set(theirs.tolist())) == 3  # distinct rows: the comparison can fail


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_in_trl_formats(tmp_path, neox_tokenizer_dir):
    from smalto.tokenizer import load_tokenizer

    tok = load_tokenizer(neox_tokenizer_dir)
    eos = tok.eos_token_id
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},  # implicit prompt: the shared start
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
    ]
    pairs = read_pairs(_write(tmp_path / "p.jsonl", rows), tok, max_length=64).pairs
    assert pairs[0].prompt == tok.encode("The sky is")
    assert pairs[0].chosen == [*tok.encode(" blue."), eos]
    assert pairs[0].rejected == [*tok.encode(" green."), eos]
    assert tok.decode(pairs[1].prompt) == "Q: 2+2? A: "
    assert tok.decode(pairs[1].chosen) == "4<|endoftext|>"
    # ChatML (the tokenizer has no template): the completion is the assistant turn after the generation prompt
    assert tok.decode(pairs[2].prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(pairs[2].chosen) == "Hello!<|im_end|>\n<|endoftext|>"
    assert pairs[2].where.endswith("p.jsonl:3")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, "p.jsonl:1: field 'rejected' is missing"),
        ({"prompt": "a", "chosen": " ", "rejected": "c"}, "p.jsonl:1: field 'chosen' is empty"),
        ({"prompt": "a", "chosen": ["x"], "rejected": "c"}, "must all be strings or all lists"),
    ],
)
def test_bad_pair_rows_are_named(tmp_path, neox_tokenizer_dir, row, message):
    from smalto.tokenizer import load_tokenizer

    with pytest.raises(DataError, match=message.replace("+", r"\+")):
        read_pairs(_write(tmp_path / "p.jsonl", [row]), load_tokenizer(neox_tokenizer_dir), max_length=64)


def test_pairs_longer_than_max_length_are_dropped_and_counted(tmp_path, neox_tokenizer_dir):
    from smalto.tokenizer import load_tokenizer

    tok = load_tokenizer(neox_tokenizer_dir)
    rows = [
        {"prompt": "a " * 40, "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "b", "rejected": "c"},
    ]
    read = read_pairs(_write(tmp_path / "p.jsonl", rows), tok, max_length=16)
    assert len(read.pairs) == 1 and read.too_long == 1
    with pytest.raises(DataError, match="no usable pair \\(2 longer than max_length 4\\)"):
        read_pairs(_write(tmp_path / "q.jsonl", [rows[0], rows[0]]), tok, max_length=4)


def test_load_reward_model_refuses_a_causal_lm_folder(tmp_path):
    from smalto.hf.save import save_pretrained

    save_pretrained(MPTForCausalLM(tiny_config(**NATIVE)), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="not a reward model folder"):
        load_reward_model(tmp_path / "lm")


def test_reward_model_without_pad_token_is_refused(tmp_path):
    model = MPTForSequenceScore.from_causal_lm(MPTForCausalLM(tiny_config(**NATIVE)), pad_token_id=None)
    with pytest.raises(ConfigError, match="needs a pad_token_id"):
        save_reward_model(model, tmp_path / "rm")


@pytest.fixture(scope="module")
def neox_base(tmp_path_factory, neox_tokenizer_dir) -> Path:
    from smalto.hf.save import save_pretrained

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rw") / "base"
    cfg = tiny_config(vocab_size=50432, max_seq_len=64, **NATIVE)
    save_pretrained(MPTForCausalLM(cfg).eval(), folder, tokenizer=str(neox_tokenizer_dir))
    return folder


def test_smalto_reward_learns_a_preference_and_writes_a_folder(tmp_path, neox_base):
    from transformers import AutoModelForSequenceClassification

    words = ["apple", "river", "stone", "cloud", "music", "paper", "glass", "tiger"]
    rows = [
        {"prompt": f"Item {i}: {w}", "chosen": " yes", "rejected": " no"}
        for i in range(24)
        for w in words[i % 8 : i % 8 + 1]
    ]
    data = _write(tmp_path / "pairs.jsonl", rows)
    run = tmp_path / "run"
    p = run_smalto(
        [
            "reward",
            "tiny-reward",
            "prepare=null",
            f"base_model={neox_base}",
            f"data.path={data}",
            f"run_dir={run}",
            "reward.steps=12",
            "reward.batch_size=4",
            "reward.eval_fraction=0.25",
            "reward.eval_every=12",
            "optimizer.lr=1e-3",
            "scheduler.warmup=0ba",
        ]
    )
    assert "held-out accuracy after:  100.0%" in p.stderr, p.stderr
    hf = AutoModelForSequenceClassification.from_pretrained(run / "hf").eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits.squeeze(-1), load_reward_model(run / "hf")(ids))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/accuracy"] == 1.0 and rows[-1]["step"] == 12


def test_reward_recipe_mistakes_exit_2(tmp_path):
    p = run_smalto(["reward", "reward.stepz=3"], check=False)
    assert p.returncode == 2 and "unknown key reward.stepz; allowed keys: steps, batch_size" in p.stderr
    assert "Traceback" not in p.stderr
    p = run_smalto(["reward", "reward.micro_batch_size=5"], check=False)
    assert (
        p.returncode == 2
        and "reward.micro_batch_size = 5 must be ≥ 1 and divide reward.batch_size (16)" in p.stderr
    )
    p = run_smalto(["reward", "prepare=null", f"base_model={tmp_path}/none"], check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr
