"""Each option changes the computation the way it should, and nothing else."""

import copy
import math

import pytest
import torch

from smalto.model.attention import alibi_slopes
from smalto.model.cache import KVCache
from tests.model.helpers import VOCAB, tiny, tokens, with_impl


def paper_slopes(n: int) -> list[float]:
    """The ALiBi paper's reference recipe (Press et al. 2022, get_slopes), written independently of ours."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", range(1, 65))
def test_alibi_slopes_follow_the_paper(n):
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(paper_slopes(n)), rtol=1e-6, atol=0)


def test_alibi_bias_max_scales_exponents():
    assert alibi_slopes(4, alibi_bias_max=16).tolist() == pytest.approx([2**-4, 2**-8, 2**-12, 2**-16])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "pos", [{}, {"attn_config": {"alibi": False, "rope": True}}, {"attn_config": {"alibi": False}}]
)
def test_left_padding_invariance(impl, pos):
    model = with_impl(tiny(**pos), impl)
    a, b = tokens(1, 10, seed=5), tokens(1, 6, seed=6)
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0], model(a).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 4:], model(b).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", [{}, {"rope": True, "alibi": False}])
def test_packed_sequence_id_equals_separate_runs(pos):
    model = tiny(attn_config={"attn_uses_sequence_id": True, **pos})
    docs = [tokens(1, n, seed=n) for n in (5, 8, 3)]
    packed = torch.cat(docs, dim=1)
    seq = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        out = model(packed, sequence_id=seq).logits[0]
        # ALiBi and RoPE are relative, so each document's logits equal a run of that document alone
        start = 0
        for d in docs:
            torch.testing.assert_close(
                out[start : start + d.shape[1]], model(d).logits[0], atol=1e-5, rtol=1e-5
            )
            start += d.shape[1]
        # without the flag the same sequence_id is ignored, and documents see each other
        model.config.attn_config.attn_uses_sequence_id = False
        assert not torch.allclose(model(packed, sequence_id=seq).logits[0], out, atol=1e-3)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = tiny(attn_config={"kv_n_heads": 2})
    mha = tiny(attn_config={"kv_n_heads": None})
    d, hd = 64, 16
    with torch.no_grad():
        for bg, bm in zip(gqa.transformer.blocks, mha.transformer.blocks, strict=True):
            wq, wk, wv = bg.attn.Wqkv.weight.split([d, 2 * hd, 2 * hd])
            # each kv head serves 2 query heads: duplicate its rows head by head
            rep = lambda w: w.view(2, hd, d).repeat_interleave(2, dim=0).reshape(4 * hd, d)
            bm.attn.Wqkv.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
            bm.attn.out_proj.weight.copy_(bg.attn.out_proj.weight)
            for name in ("norm_1", "norm_2", "ffn"):
                getattr(bm, name).load_state_dict(getattr(bg, name).state_dict())
        mha.transformer.wte.weight.copy_(gqa.transformer.wte.weight)
        mha.transformer.norm_f.weight.copy_(gqa.transformer.norm_f.weight)
        x = tokens(2, 12)
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=1e-5)


def test_kv_n_heads_equal_n_heads_is_mha():
    a, b = tiny(attn_config={"kv_n_heads": 4}), tiny(attn_config={"kv_n_heads": None})
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits)


def test_same_seed_same_model_and_loss():
    x = tokens(2, 16)
    la = tiny(seed=3).train()(x, labels=x).loss
    lb = tiny(seed=3).train()(x, labels=x).loss
    lc = tiny(seed=4).train()(x, labels=x).loss
    assert la.item() == lb.item() and la.item() != lc.item()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_logit_scale_multiplies_logits():
    x = tokens(1, 10)
    base = _logits(tiny(), x)
    torch.testing.assert_close(_logits(tiny(logit_scale=0.5), x), base * 0.5)
    torch.testing.assert_close(_logits(tiny(logit_scale="inv_sqrt_d_model"), x), base / 8.0)


def test_clip_qkv_only_acts_when_values_exceed_it():
    x = tokens(1, 10)
    base = _logits(tiny(), x)
    torch.testing.assert_close(_logits(tiny(attn_config={"clip_qkv": 1e4}), x), base)
    assert not torch.allclose(_logits(tiny(attn_config={"clip_qkv": 0.05}), x), base, atol=1e-3)


def test_window_larger_than_input_is_a_no_op_and_window_one_sees_only_itself():
    x = tokens(1, 12)
    torch.testing.assert_close(_logits(tiny(attn_config={"sliding_window_size": 12}), x), _logits(tiny(), x))
    model = tiny(attn_config={"sliding_window_size": 1})
    out = _logits(model, x)
    for t in range(12):  # each position alone gives the same logits
        torch.testing.assert_close(out[0, t], _logits(model, x[:, t : t + 1])[0, 0], atol=1e-5, rtol=1e-5)


def test_shape_options():
    assert tiny(expansion_ratio=2).transformer.blocks[0].ffn.up_proj.weight.shape == (128, 64)
    glu = tiny(ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": 96})
    assert glu.transformer.blocks[0].ffn.gate_proj.weight.shape == (96, 64)
    names = {n for n, _ in tiny(no_bias=False).named_parameters()}
    assert "transformer.blocks.0.attn.Wqkv.bias" in names and "transformer.blocks.0.norm_1.bias" in names
    assert not any(n.endswith("bias") for n, _ in tiny(no_bias=True).named_parameters())
    untied = tiny(tie_word_embeddings=False)
    assert untied.lm_head.weight.shape == (VOCAB, 64)
    assert tiny(attn_config={"alibi": False}).transformer.wpe.weight.shape == (64, 64)
    assert not hasattr(tiny(), "lm_head") and not hasattr(tiny().transformer, "wpe")


def test_embedding_fraction_scales_embedding_gradient_only():
    x = tokens(2, 10)
    full, frac = tiny().train(), tiny(embedding_fraction=0.25).train()
    lf, lp = full(x, labels=x).loss, frac(x, labels=x).loss
    assert lf.item() == pytest.approx(lp.item(), abs=1e-6)
    lf.backward()
    lp.backward()
    # the tied embedding's gradient = head part + input part; only the input part is scaled by the fraction
    g_full = full.transformer.wte.weight.grad
    g_frac = frac.transformer.wte.weight.grad
    full2 = tiny().train()  # the input part alone: the same model with the head's weight detached
    h = full2.transformer(x)
    logits = torch.nn.functional.linear(h, full2.transformer.wte.weight.detach())
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
    g_in = full2.transformer.wte.weight.grad
    torch.testing.assert_close(g_frac, g_full - 0.75 * g_in, atol=1e-6, rtol=1e-5)


def test_dropout_acts_in_training_only():
    """(eval mode equals the model without dropout: tests/model/test_reference.py)"""
    model = tiny(resid_pdrop=0.5, emb_pdrop=0.5, attn_config={"attn_pdrop": 0.5, "attn_impl": "sdpa"})
    x = tokens(1, 10)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, model(x).logits)


def test_low_precision_layernorm_runs_in_autocast_dtype():
    model = tiny(norm_type="low_precision_layernorm")
    norm = model.transformer.norm_f
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (64,), norm.weight, None, 1e-5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16
        ref = torch.nn.functional.layer_norm(x.bfloat16(), (64,), norm.weight.bfloat16(), None, 1e-5)
        assert torch.equal(norm(x), ref)


def test_autocast_over_fp32_weights_computes_what_bf16_weights_compute():
    """One GPU trains with autocast over fp32 weights, N GPUs with FSDP2's bf16 param_dtype: the residual stream
    is carried in bf16 in both, so both compute the same logits (here: bit for bit)."""
    model = with_impl(tiny(norm_type="low_precision_layernorm"), "sdpa").eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # before the hook: the copy must not record into the list
    block_inputs: list[torch.dtype] = []
    model.transformer.blocks[1].register_forward_pre_hook(
        lambda mod, args: block_inputs.append(args[0].dtype)
    )
    x = tokens(2, 12)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x).logits
        pure = bf16(x).logits
        full = model(x).logits
    assert block_inputs == [torch.bfloat16, torch.float32]  # autocast: bf16 residual; without: fp32 as before
    assert torch.equal(mixed, pure)
    assert full.dtype == torch.float32


@pytest.mark.parametrize("cached", [False, True])
def test_long_inputs_run_sdpa_in_query_chunks_within_the_bias_budget(monkeypatch, cached):
    """A bias larger than SDPA_BIAS_BUDGET is never built: the queries run in chunks, with the same outputs and
    gradients (here with padding, so the bias is per row)."""
    import smalto.model.attention as attention

    model = with_impl(tiny(max_seq_len=64), "sdpa").train()
    x = tokens(2, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False

    def run():
        model.zero_grad()
        if cached:
            cache = KVCache.for_model(model.config, 2, 48, torch.float32, "cpu")
            out = model(x, attention_mask=mask, past_key_values=cache).logits
        else:
            out = model(x, attention_mask=mask).logits
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = run()
    built: list[int] = []
    real_bias = attention.sdpa_bias

    def counting_bias(*args, **kwargs):
        b = real_bias(*args, **kwargs)
        built.append(b.numel())
        return b

    n_keys = 48 if cached else 40
    monkeypatch.setattr(attention, "SDPA_BIAS_BUDGET", 2 * 4 * n_keys * 7)  # 7 queries × 2 rows × 4 heads × S
    monkeypatch.setattr(attention, "sdpa_bias", counting_bias)
    got, got_grads = run()
    assert built and max(built) <= attention.SDPA_BIAS_BUDGET
    assert len(built) == model.config.n_layers * -(-40 // 7)  # 6 chunks per layer
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_rope_matches_transformers_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from smalto.model.attention import apply_rope, rope_cos_sin

    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    cos, sin = rope_cos_sin(torch.arange(9), 16, 10000.0)
    rq, rk = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(q, cos, sin), rq)
    torch.testing.assert_close(apply_rope(k, cos, sin), rk)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize(
    "pos", [{}, {"attn_config": {"rope": True, "alibi": False}}, {"attn_config": {"kv_n_heads": 1}}]
)
def test_cached_decode_equals_full_forward(impl, pos):
    model = with_impl(tiny(**pos), impl)
    x = tokens(2, 14)
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache.for_model(model.config, 2, 20, torch.float32, "cpu")
        parts = [model(x[:, :8], past_key_values=cache).logits]
        for t in range(8, 14):
            parts.append(model(x[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 14


def test_cache_overflow_and_long_inputs_are_refused():
    from smalto.errors import UserError

    model = tiny()
    cache = KVCache.for_model(model.config, 1, 8, torch.float32, "cpu")
    model(tokens(1, 6), past_key_values=cache)
    with pytest.raises(UserError, match="KV cache holds 8 tokens and 6 are used"):
        model(tokens(1, 3), past_key_values=cache)
    with pytest.raises(UserError, match="longer than max_seq_len"):
        model(tokens(1, 65))


@pytest.mark.parametrize("pos", [{}, {"attn_config": {"alibi": False}}])
def test_left_padded_cached_decode_equals_unpadded_rows(pos):
    """Decode steps pass no mask: the cache's record of padding alone gives the right positions and keys."""
    model = with_impl(tiny(**pos), "sdpa")
    a, b = tokens(1, 9, seed=7), tokens(1, 5, seed=8)
    prompt = torch.zeros(2, 6, dtype=torch.long)
    prompt[0], prompt[1, 3:] = a[0, :6], b[0, :3]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :3] = False
    nxt = torch.stack([a[0, 6:8], b[0, 3:5]])  # two more tokens per row
    with torch.no_grad():
        cache = KVCache.for_model(model.config, 2, 12, torch.float32, "cpu")
        model(prompt, attention_mask=mask, past_key_values=cache)
        steps = [model(nxt[:, i : i + 1], past_key_values=cache).logits[:, 0] for i in range(2)]
        torch.testing.assert_close(steps[1][0], model(a[:, :8]).logits[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(steps[1][1], model(b[:, :5]).logits[0, -1], atol=1e-5, rtol=1e-5)
