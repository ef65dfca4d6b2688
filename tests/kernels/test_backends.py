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
    "llama-yarn-head-dim": {
        "attn_config": {
            "alibi": False,
            "rope": True,
            "kv_n_heads": 2,
            "head_dim": 24,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
        },
        "norm_type": "rmsnorm",
    },
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

    with pytest.raises(ConfigError, match="no backward on CPU"):
        with_impl(tiny(), "flex", modes=("train",))


def test_auto_trains_on_cpu():
    model = with_impl(tiny(), "auto", modes=("train", "score")).train()
    assert model.transformer.plans["train"].kernel.name == "sdpa"
    model(tokens(2, 8), labels=tokens(2, 8)).loss.backward()
    g = model.transformer.wte.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ---------------------------------------------------------------- the plan of each mode

CUDA = torch.device("cuda")


def _select(monkeypatch, impl: str, mode: str, cudnn_reason=None, decode_reason=None, **overrides):
    """`select` as on a CUDA machine, cuDNN's and the decode kernel's answers given (their kernels run in
    tests/gpu)."""
    from smalto.kernels import cudnn_attention, decode_attention, select

    monkeypatch.setattr(cudnn_attention, "why_not", lambda *a, **k: cudnn_reason)
    monkeypatch.setattr(decode_attention, "why_not", lambda *a, **k: decode_reason)
    config = tiny(**overrides).config
    config.attn_config.attn_impl = impl
    return select(config, mode, device=CUDA, dtype=torch.bfloat16, batch=4, seq=64)


def test_auto_trains_with_cudnn_where_it_applies_and_flex_elsewhere(monkeypatch):
    from smalto.kernels import cudnn_attention

    plan = _select(monkeypatch, "auto", "train")
    assert (plan.kernel.name, plan.fallback.name) == ("cudnn", "flex")  # flex for padded or packed batches
    assert plan.name == "cudnn (flex for masked batches)"
    plan = _select(monkeypatch, "auto", "train", cudnn_reason=cudnn_attention.MISSING)
    assert plan.kernel.name == "flex" and "nvidia-cudnn-frontend" in plan.reason
    packed = _select(monkeypatch, "auto", "train", attn_config={"attn_uses_sequence_id": True})
    assert packed.kernel.name == "flex" and "packed documents" in packed.reason
    dropout = _select(monkeypatch, "auto", "train", attn_config={"attn_pdrop": 0.1})
    assert dropout.kernel.name == "sdpa"
    for mode in ("score", "prefill"):  # inference never builds cuDNN graphs
        assert _select(monkeypatch, "auto", mode).kernel.name == "sdpa"


def test_explicit_cudnn_names_why_it_cannot_train(monkeypatch):
    from smalto.errors import ConfigError
    from smalto.kernels import cudnn_attention

    with pytest.raises(ConfigError, match=r"attn_impl 'cudnn' cannot train.*nvidia-cudnn-frontend"):
        _select(monkeypatch, "cudnn", "train", cudnn_reason=cudnn_attention.MISSING)
    assert _select(monkeypatch, "cudnn", "score", cudnn_reason="anything").kernel.name == "sdpa"


def test_decode_takes_the_kernel_when_it_fills_the_gpu(monkeypatch):
    assert _select(monkeypatch, "auto", "decode").kernel.name == "decode"
    plan = _select(monkeypatch, "auto", "decode", decode_reason="32 programs do not fill 132 SMs")
    assert plan.kernel.name == "sdpa" and "132 SMs" in plan.reason
    assert _select(monkeypatch, "flex", "decode").kernel.name == "flex"  # asked for: given
    assert _select(monkeypatch, "eager", "decode").kernel.name == "eager"


def test_a_mask_the_kernel_does_not_take_goes_to_the_fallback():
    from smalto.model.attention import EAGER, SDPA, AttentionKernel, AttentionMask, AttentionPlan

    causal = AttentionKernel("causal", EAGER.attend, accepts=lambda m: m.causal_only)
    plan = AttentionPlan(causal, "test", fallback=SDPA)
    q_pos = torch.arange(4)
    assert plan.kernel_for(AttentionMask(q_pos=q_pos, n_keys=4, from_zero=True)) is causal
    padded = AttentionMask(q_pos=q_pos, n_keys=4, key_valid=torch.ones(1, 4, dtype=torch.bool))
    assert plan.kernel_for(padded) is SDPA
    with pytest.raises(ValueError, match="no fallback"):
        AttentionPlan(causal, "test").kernel_for(padded)


def test_cudnn_reasons_on_this_machine():
    from smalto.errors import ConfigError
    from smalto.kernels import cudnn_attention

    args = dict(dtype=torch.bfloat16, batch=2, seq=16)
    assert (
        cudnn_attention.why_not(tiny().config, device=torch.device("cpu"), **args) == "it runs on CUDA only"
    )
    with pytest.raises(ConfigError, match="attn_impl 'cudnn' cannot train this model: it runs on CUDA only"):
        with_impl(tiny(), "cudnn", modes=("train",))


def test_a_forward_does_not_select(monkeypatch):
    """The plan is chosen once per mode: forwards (training, scoring, generation's steps) never call `select`."""
    import smalto.generate
    import smalto.kernels.plans as sel
    from smalto.generate import generate

    model = with_impl(tiny(), "auto", modes=("train", "score", "prefill")).train()
    calls = []
    real = sel.select
    monkeypatch.setattr(sel, "select", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(smalto.generate, "select", sel.select)
    model(tokens(2, 8), labels=tokens(2, 8)).loss.backward()
    with torch.no_grad():
        model.eval()(tokens(2, 8))
    assert calls == []
    generate(model, None, [[1, 2, 3]], max_new_tokens=6, temperature=0, compile=False)
    assert sorted(calls) == ["decode", "prefill"]  # the decoder's two plans, once, however many steps
    generate(model, None, [[1, 2, 3]], max_new_tokens=6, temperature=0, compile=False)
    assert len(calls) == 2  # the same decoder again: no new choice
