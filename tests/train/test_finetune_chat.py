"""A chat finetune: `<|im_start|>` / `<|im_end|>` become single special tokens with MPT-7B-Chat's ids (50277,
50278) on the GPT-NeoX tokenizer, in the training examples, the exported tokenizer and generation_config.json; and
during finetuning, ICL tasks from `smalto eval` scored every `finetune.icl_every` steps and greedy samples from
held-out prompts reach the console, metrics.jsonl and TensorBoard. Bad ICL settings exit 2 up front."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from smalto.data.templates import CHATML_TEMPLATE
from smalto.errors import ConfigError
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


def chat_recipe(tmp: Path, neox_tokenizer_dir: Path, shared_dir: Path, **finetune) -> Path:
    from smalto.hf.save import save_pretrained
    from smalto.model.mpt import MPTForCausalLM

    if not (tmp / "base").exists():
        torch.manual_seed(0)
        cfg = tiny_config(vocab_size=50432, max_seq_len=64, no_bias=True, attn_config={"alibi": True})
        save_pretrained(
            MPTForCausalLM(cfg).eval(), str(tmp / "base"), tokenizer=load_tokenizer(neox_tokenizer_dir)
        )
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
        for w in ["red", "blue", "green", "gold"] * 5
    ]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "icl",
        "run_dir": str(tmp / "run"),
        "base_model": str(tmp / "base"),
        "data": {
            "sources": [{"path": str(tmp / "rows.jsonl"), "preprocessing": "chat"}],
            "seq_len": 64,
            "eval_fraction": 0.25,
            "packing": False,
        },
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {
            "max_duration": "3ba",
            "global_batch_size": 4,
            "device": "cpu",
            "precision": "fp32",
            "eval_first": True,
            "eval_interval": "1ba",
            "eval_batches": 1,
        },
        "finetune": {
            "samples": 1,
            "sample_tokens": 3,
            "icl_tasks": ["copa"],
            "icl_every": 2,
            "icl_limit": 4,
            "icl_data_root": str(shared_dir / "icl_data"),
            **finetune,
        },
        "logging": {"progress": False, "tensorboard": True},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def chat_run(neox_tokenizer_dir, shared_dir, tmp_path_factory):
    """A 3-step chat finetune with ICL every 2 steps, samples and TensorBoard; its result, folder, recipe, stderr."""
    from smalto.finetune import finetune

    tmp = tmp_path_factory.mktemp("chat")
    recipe = chat_recipe(tmp, neox_tokenizer_dir, shared_dir)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the run's console (rich prints to the current sys.stderr)
        result = finetune(str(recipe))
    return result, tmp, recipe, err.getvalue()


def test_chat_recipe_trains_and_exports_the_chatml_tokens(chat_run):
    from transformers import AutoTokenizer

    from smalto.data.finetune_stream import read_sources
    from smalto.finetune import load_finetune_config
    from smalto.train.finetune import finetune_tokenizer

    result, _, recipe, _ = chat_run
    cfg = load_finetune_config(str(recipe))
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


def test_icl_and_samples_reach_console_metrics_and_tensorboard(chat_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, tmp, _, err = chat_run
    run = tmp / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    icl = {r["step"]: r["icl/copa/0-shot"] for r in rows if "icl/copa/0-shot" in r}
    assert sorted(icl) == [0, 2, 3]  # the first evaluation, 2 steps later, and the last
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in icl.values())  # accuracy over 4 items
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("ICL at step")] == [
        "ICL at step 0",
        "ICL at step 2",
        "ICL at step 3",
    ]
    assert "sample 0 at step 3:" in err and "Say" in err
    events = EventAccumulator(
        str(next(run.rglob("events.out.tfevents.*")).parent), size_guidance={"tensors": 0}
    )
    events.Reload()
    assert [e.step for e in events.Scalars("icl/copa/0-shot")] == [0, 2, 3]
    assert {e.step for e in events.Tensors("samples/0/text_summary")} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "setting,words",
    [
        ({"icl_tasks": ["no_such_task"]}, "no_such_task"),
        ({"icl_every": -1}, "finetune.icl_every"),
        ({"icl_data_root": "/nope"}, "/nope is not a folder"),
    ],
)
def test_bad_icl_settings_are_named(tmp_path, neox_tokenizer_dir, shared_dir, setting, words):
    from smalto.finetune import load_finetune_config

    with pytest.raises(ConfigError, match=words):
        load_finetune_config(str(chat_recipe(tmp_path, neox_tokenizer_dir, shared_dir, **setting)))
