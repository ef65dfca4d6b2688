"""MFU of a LoRA run counts what the step computes: no weight-gradient products for the frozen base."""

from __future__ import annotations

from smalto.adapters import LoraConfig, apply_lora
from smalto.model.mpt import MPTForCausalLM
from smalto.train.metrics import lora_flops_per_token
from tests.helpers import tiny_config


def test_frozen_parameters_count_four_flops_a_token_trainable_ones_six() -> None:
    cfg = tiny_config()
    model = MPTForCausalLM(cfg)
    seq = 32
    attention = 12 * cfg.n_layers * cfg.d_model * seq
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["Wqkv"]))
    d = cfg.d_model
    adapters = cfg.n_layers * (4 * d + 3 * d * 4)  # A (r × d) and B (3d × r) on each block's Wqkv
    got = lora_flops_per_token(model, cfg.n_layers, d, seq)
    assert got == 4 * cfg.num_params() + 6 * adapters + attention
    assert got < cfg.flops_per_token(seq)  # llm-foundry's 6·N would credit gradients never computed
