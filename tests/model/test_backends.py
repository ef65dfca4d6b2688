"""Every kernel agrees with `eager` in outputs, and (where it has a backward) in every parameter's gradient."""

import copy

import pytest
import torch

from tests.model.helpers import tiny, tokens, with_impl

CONFIGS = {
    "alibi": {},
    "alibi-6-heads": {"d_model": 96, "n_heads": 6},
    "rope": {"attn_config": {"alibi": False, "rope": True}},
    "gqa": {"attn_config": {"kv_n_heads": 2}},
    "mqa-qkln-clip": {"attn_config": {"kv_n_heads": 1, "qk_ln": True, "clip_qkv": 0.3}},
    "qk_gn": {"attn_config": {"qk_gn": True}},
    "window": {"attn_config": {"sliding_window_size": 5}},
    "seqid": {"attn_config": {"attn_uses_sequence_id": True}},
    "glu-rms": {"ffn_config": {"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}}, "norm_type": "rmsnorm"},
    "learned-pos": {"attn_config": {"alibi": False}, "learned_pos_emb": True},
}


def _batch(with_padding: bool):
    x = tokens(2, 24)
    seq = torch.zeros_like(x)
    seq[:, 9:] = 1
    seq[:, 17:] = 2
    mask = torch.ones_like(x, dtype=torch.bool)
    if with_padding:
        mask[1, :7] = False
    return x, seq, mask


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_eager(name, impl):
    model = tiny(**CONFIGS[name])
    x, seq, mask = _batch(with_padding=name != "seqid")
    with torch.no_grad():
        ref = with_impl(model, "eager")(x, attention_mask=mask, sequence_id=seq).logits
        got = with_impl(model, impl)(x, attention_mask=mask, sequence_id=seq).logits
    keep = mask[:, :, None].expand_as(ref)
    torch.testing.assert_close(got[keep], ref[keep], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sdpa_gradients_match_eager(name):
    ref_model = with_impl(tiny(**CONFIGS[name]), "eager").train()
    sdpa_model = with_impl(copy.deepcopy(ref_model), "sdpa").train()
    x, seq, _ = _batch(False)
    for m in (ref_model, sdpa_model):
        m(x, labels=x, sequence_id=seq).loss.backward()
    for (n, p), (_, q) in zip(ref_model.named_parameters(), sdpa_model.named_parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_flex_refuses_backward_on_cpu_with_reason():
    from smalto.errors import ConfigError

    model = with_impl(tiny(), "flex").train()
    with pytest.raises(ConfigError, match="no backward on CPU"):
        model(tokens(1, 8))


def test_auto_trains_on_cpu():
    model = with_impl(tiny(), "auto").train()
    model(tokens(2, 8), labels=tokens(2, 8)).loss.backward()
    g = model.transformer.wte.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- choosing cuDNN (its kernels run in tests/gpu)

CUDA = torch.device("cuda")


def _resolve(impl: str, reason: str | None, *, training: bool = True, decode: bool = False) -> str:
    from smalto.model.attention import resolve_attn_impl

    with torch.enable_grad():
        return resolve_attn_impl(
            impl,
            device=CUDA,
            training=training,
            dropout=False,
            decode=decode,
            cudnn_unsupported=lambda: reason,
        )


def test_auto_trains_with_cudnn_where_it_applies_and_flex_elsewhere():
    from smalto.model import cudnn_attention

    assert _resolve("auto", None) == "cudnn"
    assert _resolve("auto", cudnn_attention.MISSING) == "flex"
    assert _resolve("auto", cudnn_attention.MASK_REASON + " (padding)") == "flex"
    assert _resolve("auto", None, training=False) == "sdpa"  # inference never builds cuDNN graphs


def test_explicit_cudnn_names_why_it_cannot_train():
    from smalto.errors import ConfigError
    from smalto.model import cudnn_attention

    with pytest.raises(ConfigError, match=r"attn_impl 'cudnn' cannot train.*nvidia-cudnn-frontend"):
        _resolve("cudnn", cudnn_attention.MISSING)
    assert _resolve("cudnn", cudnn_attention.MASK_REASON + " (a window)") == "flex"  # that batch only
    assert _resolve("cudnn", "anything", training=False) == "sdpa"  # inference: what auto takes


def test_cudnn_reasons_on_this_machine():
    from smalto.errors import ConfigError
    from smalto.model import cudnn_attention

    args = dict(dtype=torch.bfloat16, batch=2, seq=16, causal_from_zero=True)
    assert (
        cudnn_attention.why_not(tiny().config, device=torch.device("cpu"), **args) == "it runs on CUDA only"
    )
    with pytest.raises(ConfigError, match="attn_impl 'cudnn' cannot train this model: it runs on CUDA only"):
        with_impl(tiny(), "cudnn").train()(tokens(1, 8), labels=tokens(1, 8))
