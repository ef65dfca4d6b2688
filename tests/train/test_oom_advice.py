"""The out-of-memory message names levers that exist: the micro-batch while it can shrink, else the others."""

from __future__ import annotations

from smalto.config import load_config
from smalto.train.loop import out_of_memory_advice


def test_a_micro_batch_above_one_is_halved() -> None:
    cfg = load_config("tiny", ["train.micro_batch_size=8", "train.global_batch_size=16"])
    msg = out_of_memory_advice(cfg, 8)
    assert "train.micro_batch_size = 8; lower it (e.g. train.micro_batch_size=4)" in msg
    assert "train.activation_checkpointing" in msg


def test_a_micro_batch_of_one_names_the_other_levers_not_the_micro_batch() -> None:
    cfg = load_config("tiny", ["train.micro_batch_size=1", "train.loss=full", "data.seq_len=128"])
    msg = out_of_memory_advice(cfg, 1)
    assert "lower it" not in msg
    for lever in (
        "data.seq_len = 128",
        "train.activation_checkpointing=true",
        "train.loss=chunked",
        "train.weight_cast=micro_batch",
        "optimizer.offload=cpu",
        "torchrun",
    ):
        assert lever in msg, lever
    done = load_config(
        "tiny",
        [
            "train.micro_batch_size=1",
            "train.activation_checkpointing=true",
            "train.weight_cast=micro_batch",
            "optimizer.offload=cpu",
        ],
    )
    msg = out_of_memory_advice(done, 1)
    assert "activation_checkpointing" not in msg and "train.loss" not in msg and "weight_cast" not in msg
    assert "offload" not in msg
