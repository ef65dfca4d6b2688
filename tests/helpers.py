"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smalto.model.config import MPTConfig

# Only the size makes it tiny; every other field is MPTConfig's default (llm-foundry's: no ALiBi, learned
# positions, biases), so a test states the architecture it relies on as overrides.
TINY = {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 32, "vocab_size": 256}


def tiny_config(**overrides: Any) -> MPTConfig:
    """A 2-layer, d_model-64 MPT config; `overrides` replace fields (a nested `attn_config` dict replaces the
    defaults it names, as in `MPTConfig.from_dict`)."""
    return MPTConfig.from_dict({**TINY, **overrides})


def greedy_generate_args(model_dir: Path, *flags: str) -> list[str]:
    """`smalto generate` arguments for 8 greedy tokens after "Hello world" on the CPU, then `flags`: what
    `generate(model, tok, ["Hello world"], max_new_tokens=8, temperature=0)` completes in-process."""
    return [
        "generate",
        str(model_dir),
        "--prompt",
        "Hello world",
        "-n",
        "8",
        "--temperature",
        "0",
        "--device",
        "cpu",
        *flags,
    ]
