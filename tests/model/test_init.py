"""Initialisation: the schemes' statistics, and meta-device build + materialisation == CPU init."""

import math

import pytest
import torch

from smalto.model.mpt import MPTForCausalLM
from tests.helpers import tiny_config

# wider and deeper than the tiny default, so the weights' standard deviations are measured on enough samples
CFG = {"d_model": 128, "n_layers": 4, "vocab_size": 512, "no_bias": True, "attn_config": {"alibi": True}}


def _stds(model):
    return {n: p.detach().float().std().item() for n, p in model.named_parameters()}


def test_kaiming_normal_fan_in_with_residual_division():
    model = MPTForCausalLM(tiny_config(**CFG))
    blk = model.transformer.blocks[0]
    gain = math.sqrt(2)  # relu, a=0
    assert blk.ffn.up_proj.weight.std().item() == pytest.approx(gain / math.sqrt(128), rel=0.05)
    # residual projections are divided by sqrt(2 * n_layers)
    assert blk.attn.out_proj.weight.std().item() == pytest.approx(
        gain / math.sqrt(128) / math.sqrt(8), rel=0.05
    )
    assert blk.ffn.down_proj.weight.std().item() == pytest.approx(
        gain / math.sqrt(512) / math.sqrt(8), rel=0.05
    )
    assert torch.equal(blk.norm_1.weight, torch.ones(128))


def test_small_init_and_emb_std():
    cfg = {**CFG, "init_config": {"name": "small_init_", "emb_init_std": 0.5, "init_div_is_residual": False}}
    model = MPTForCausalLM(tiny_config(**cfg))
    std = math.sqrt(2 / (5 * 128))
    assert model.transformer.blocks[1].attn.Wqkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.transformer.blocks[1].attn.out_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.5, rel=0.05)


def test_meta_build_then_materialise_matches_cpu_init():
    cfg = tiny_config(**CFG, init_device="meta")
    meta = MPTForCausalLM(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    torch.manual_seed(0)
    cpu = MPTForCausalLM(tiny_config(**CFG))
    a, b = _stds(meta), _stds(cpu)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), name
    # the same seed gives the very same weights: the meta path runs the same initialisation
    for (n, p), (_, q) in zip(meta.named_parameters(), cpu.named_parameters(), strict=True):
        assert torch.equal(p, q), n
