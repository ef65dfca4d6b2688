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
            "train.loss=chunked",
            "train.weight_cast=micro_batch",
            "optimizer.offload=cpu",
        ],
    )
    msg = out_of_memory_advice(done, 1)
    assert "activation_checkpointing" not in msg and "train.loss" not in msg and "weight_cast" not in msg
    assert "offload" not in msg


def test_the_loss_is_named_only_where_it_would_still_hold_the_full_logits() -> None:
    short = load_config("tiny", ["train.micro_batch_size=1", "data.seq_len=128"])  # auto: full logits at 128
    assert short.train.loss == "auto" and "train.loss=chunked" in out_of_memory_advice(short, 1)
    long = ["model.max_seq_len=65536", "data.seq_len=65536", "model.vocab_size=50432"]
    at_65k = load_config(
        "tiny", ["train.micro_batch_size=1", *long]
    )  # auto: chunked already (13 GB of logits)
    assert "train.loss" not in out_of_memory_advice(at_65k, 1)
    assert "data.seq_len = 65536" in out_of_memory_advice(at_65k, 1)


def test_in_the_optimizer_step_only_the_states_levers_are_named() -> None:
    adamw = load_config(
        "tiny", ["optimizer.name=adamw", "train.micro_batch_size=8", "train.global_batch_size=16"]
    )
    msg = out_of_memory_advice(adamw, 8, in_optimizer=True)
    assert msg.startswith(
        "out of memory in the optimizer step (allocating its state); try optimizer.offload=cpu"
    )
    assert "optimizer.state_dtype=bf16" in msg and "optimizer.name=lion" in msg and "torchrun" in msg
    assert "micro_batch_size" not in msg and "seq_len" not in msg
    lion = load_config("tiny", ["optimizer.offload=cpu"])
    msg = out_of_memory_advice(lion, 1, in_optimizer=True)
    assert (
        "offload" not in msg
        and "state_dtype" not in msg
        and "optimizer.name" not in msg
        and "torchrun" in msg
    )
