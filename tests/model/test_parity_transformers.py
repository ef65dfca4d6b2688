"""Same weights, same logits as transformers' native MptForCausalLM (the public reference implementation)."""

import pytest
import torch
import transformers

from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from tests.model.helpers import with_impl


def _pair(seed: int = 0, **hf_kwargs):
    torch.manual_seed(seed)
    kw = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 64,
        "vocab_size": 100,
        "no_bias": True,
        "attn_config": {"alibi": True, "alibi_bias_max": 8},
    }
    kw.update(hf_kwargs)
    hf_cfg = transformers.MptConfig(**kw)
    hf = transformers.MptForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norm weights too, so a misplaced norm cannot hide
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    ours = MPTForCausalLM(MPTConfig.from_dict(hf_cfg.to_dict(), strict=False)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert missing == [] and unexpected == ["lm_head.weight"]  # transformers keeps the tied head as a key
    return hf, ours


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize(
    "hf_kwargs",
    [
        {},
        {"n_heads": 8},
        {"n_heads": 2, "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.5}},
        {"n_heads": 4, "attn_config": {"alibi": True, "alibi_bias_max": 8, "softmax_scale": 0.3}},
        {"norm_type": "layernorm", "layer_norm_epsilon": 1e-3},
    ],
)
def test_logits_match_transformers(impl, hf_kwargs):
    hf, ours = _pair(**hf_kwargs)
    with_impl(ours, impl)
    x = torch.randint(0, 100, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_loss_matches_transformers():
    hf, ours = _pair(1)
    x = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    labels = x.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, labels=labels).loss, hf(x, labels=labels).loss, atol=1e-6, rtol=1e-6
        )


def test_padded_rows_match_transformers_on_real_tokens():
    hf, ours = _pair(2)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, :6] = 0  # left padding
    with torch.no_grad():
        ref = hf(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask).logits
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 6:], ref[1, 6:], atol=1e-5, rtol=1e-5)
