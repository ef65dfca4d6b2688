"""During finetuning: ICL tasks from `smalto eval` scored every `finetune.icl_every` steps, and greedy samples from
held-out prompts, both on the console, in metrics.jsonl and in TensorBoard; bad ICL settings exit 2 up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from smalto.errors import ConfigError
from smalto.tokenizer import load_tokenizer
from tests.helpers import tiny_config


def chat_recipe(tmp: Path, neox_tokenizer_dir: Path, shared_dir: Path, **finetune) -> Path:
    from smalto.hf.save import save_pretrained
    from smalto.model.mpt import MPTForCausalLM

    if not (tmp / "base").exists():
        torch.manual_seed(0)
        cfg = tiny_config(vocab_size=50432, max_seq_len=64, no_bias=True, attn_config={"alibi": True})
        save_pretrained(
            MPTForCausalLM(cfg).eval(), str(tmp / "base"), tokenizer=load_tokenizer(neox_tokenizer_dir)
        )
    rows = [{"prompt": f"Say {w}.", "response": f" {w}!"} for w in ["red", "blue", "green", "gold"] * 5]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "icl",
        "run_dir": str(tmp / "run"),
        "base_model": str(tmp / "base"),
        "data": {
            "sources": [{"path": str(tmp / "rows.jsonl"), "preprocessing": "prompt_response"}],
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
        "checkpoint": {"hf_export": None},
        "logging": {"progress": False, "tensorboard": True},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_icl_and_samples_reach_console_metrics_and_tensorboard(
    tmp_path, neox_tokenizer_dir, shared_dir, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from smalto.finetune import finetune

    finetune(str(chat_recipe(tmp_path, neox_tokenizer_dir, shared_dir)))
    err = capsys.readouterr().err
    run = tmp_path / "run"
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
