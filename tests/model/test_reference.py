"""Our layers against references written here from the published formulas, independent of smalto's mask and
bias code, and against transformers' Llama for the LLaMA-style options (RoPE, GQA, RMSNorm, SwiGLU, untied head)."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from smalto.kernels.flex_attention import flex_attention_fn, flex_block_mask
from smalto.model.attention import (
    AttentionMask,
    eager_attention,
    sdpa_attention,
    sdpa_attention_in_chunks,
    sdpa_bias,
)
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from tests.model.helpers import tiny, tokens
from tests.model.test_semantics import paper_slopes


def allowed(
    i: int, j: int, b: int, *, window: int, seq: torch.Tensor | None, valid: torch.Tensor | None
) -> bool:
    """Which key j query i of row b sees, rule by rule."""
    if j > i:
        return False  # causal
    if i == j:
        return True  # a token always sees itself (so padding rows stay finite)
    if window > 0 and i - j >= window:
        return False
    if seq is not None and seq[b, i] != seq[b, j]:
        return False
    return valid is None or bool(valid[b, j])


def reference_attention(q, k, v, *, scale, slopes=None, window=-1, seq=None, valid=None):
    """softmax(q·k·scale + slope·(j − i), masked) v with the mask from `allowed`; q (B,H,T,D), k/v (B,K,T,D)."""
    B, H, T, _ = q.shape
    rep = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // rep], v[b, h // rep]
            for i in range(T):
                keys = [j for j in range(T) if allowed(i, j, b, window=window, seq=seq, valid=valid)]
                s = torch.stack([(q[b, h, i] * kh[j]).sum() * scale for j in keys])
                if slopes is not None:
                    s = s + torch.tensor([slopes[h] * (j - i) for j in keys])
                p = torch.softmax(s, dim=0)
                out[b, h, i] = (p[:, None] * vh[keys]).sum(0)
    return out


CASES = {
    "alibi": {},
    "alibi-gqa": {"kv": 2},
    "window": {"window": 3},
    "seq": {"seq": True},
    "padding": {"pad": True},
    "all": {"kv": 1, "window": 4, "seq": True, "pad": True},
}


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "sdpa-chunked", "flex"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_written_out_formula(case, kernel):
    c = CASES[case]
    B, H, T, D = 2, 4, 10, 8
    K = c.get("kv", H)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, K, K))
    seq = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3]) if c.get("seq") else None
    valid = torch.ones(B, T, dtype=torch.bool)
    if c.get("pad"):
        valid[1, :3] = False
    valid_or_none = valid if c.get("pad") else None
    slopes = paper_slopes(H)
    window = c.get("window", -1)
    ref = reference_attention(q, k, v, scale=0.3, slopes=slopes, window=window, seq=seq, valid=valid_or_none)
    mask = AttentionMask(
        q_pos=torch.arange(T),
        n_keys=T,
        key_valid=valid_or_none,
        seq_q=seq,
        seq_k=seq,
        window=window,
        from_zero=True,
    )
    s = torch.tensor(slopes)
    with torch.no_grad():
        if kernel == "eager":
            got = eager_attention(q, k, v, mask, s, 0.3, 0.0)
        elif kernel == "sdpa":
            got = sdpa_attention(q, k, v, mask, s, 0.3, 0.0, sdpa_bias(mask, s, q.dtype))
        elif kernel == "sdpa-chunked":  # 3 queries at a time: chunks that split documents and windows
            got = sdpa_attention_in_chunks(q, k, v, mask, s, 0.3, 0.0, chunk=3)
        else:
            got = flex_attention_fn(q, k, v, mask, s, 0.3, flex_block_mask(mask, H))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def manual_mpt_attention(attn, x, cfg: MPTConfig):
    """MPT's attention layer as llm-foundry describes it, from the module's weights only."""
    B, T, d = x.shape
    H, K, D = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
    qkv = x @ attn.Wqkv.weight.T
    if cfg.attn_config.clip_qkv is not None:
        qkv = qkv.clamp(-cfg.attn_config.clip_qkv, cfg.attn_config.clip_qkv)
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    if cfg.attn_config.qk_ln:
        q = F.layer_norm(q, (H * D,), attn.q_ln.weight, None, cfg.norm_eps)
        k = F.layer_norm(k, (K * D,), attn.k_ln.weight, None, cfg.norm_eps)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    scale = cfg.attn_config.softmax_scale or 1 / math.sqrt(D)
    slopes = [
        2 ** (-cfg.attn_config.alibi_bias_max * (h + 1) / H) for h in range(H)
    ]  # H is a power of two here
    y = reference_attention(q, k, v, scale=scale, slopes=slopes, window=cfg.attn_config.sliding_window_size)
    return y.transpose(1, 2).reshape(B, T, d) @ attn.out_proj.weight.T


@pytest.mark.parametrize(
    "attn_config",
    [
        {"qk_ln": True},
        {"softmax_scale": 1.0},
        {"clip_qkv": 0.1},
        {"alibi_bias_max": 2},
        {"alibi_bias_max": 16, "kv_n_heads": 2},
        {"sliding_window_size": 3, "qk_ln": True, "kv_n_heads": 1},
    ],
)
def test_attention_layer_options_follow_the_formula(attn_config):
    model = tiny(attn_config=attn_config)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    block = model.transformer.blocks[0]
    with torch.no_grad():
        from smalto.model.attention import build_attention_inputs, reference_plan

        mask = AttentionMask(
            q_pos=torch.arange(9),
            n_keys=9,
            window=model.config.attn_config.sliding_window_size,
            from_zero=True,
        )
        got = block.attn(x, build_attention_inputs(model.config, mask, reference_plan(model.config), x.dtype))
        ref = manual_mpt_attention(block.attn, x, model.config)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_norms_and_activations_follow_their_formulas():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    rms = tiny(norm_type="rmsnorm", norm_eps=0.1).transformer.norm_f
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.1) * rms.weight)
    ln = tiny(norm_eps=0.5).transformer.norm_f
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 0.5) * ln.weight)
    ffn = tiny(ffn_config={"ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}).transformer.blocks[0].ffn
    u = x @ ffn.up_proj.weight.T
    gelu_tanh = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    torch.testing.assert_close(ffn(x), gelu_tanh @ ffn.down_proj.weight.T, atol=1e-5, rtol=1e-5)
    exact = tiny().transformer.blocks[0].ffn
    u = x @ exact.up_proj.weight.T
    torch.testing.assert_close(
        exact(x),
        (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ exact.down_proj.weight.T,
        atol=1e-5,
        rtol=1e-5,
    )


def test_dropout_changes_nothing_in_eval_mode():
    x = tokens(2, 10)
    plain = tiny()
    dropped = tiny(resid_pdrop=0.5, emb_pdrop=0.5, attn_config={"attn_pdrop": 0.5, "attn_impl": "sdpa"})
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x).logits, plain.eval()(x).logits)


def test_llama_style_options_match_transformers_llama():
    """RoPE + GQA + RMSNorm + SwiGLU + untied head, no biases: the same weights give Llama's logits."""
    torch.manual_seed(0)
    d, H, K, f, V, L = 64, 4, 2, 96, 128, 2
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=d,
            intermediate_size=f,
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=K,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        )
    ).eval()
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    cfg = MPTConfig(
        d_model=d,
        n_heads=H,
        n_layers=L,
        max_seq_len=64,
        vocab_size=V,
        no_bias=True,
        norm_type="rmsnorm",
        tie_word_embeddings=False,
        learned_pos_emb=False,
        attn_config={"rope": True, "rope_theta": 10000.0, "kv_n_heads": K, "attn_impl": "sdpa"},
        ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": f, "ffn_act_fn": {"name": "silu"}},
    )
    ours = MPTForCausalLM(cfg).eval()
    src = llama.state_dict()
    sd = {
        "transformer.wte.weight": src["model.embed_tokens.weight"],
        "transformer.norm_f.weight": src["model.norm.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(L):
        a, b = f"model.layers.{i}.", f"transformer.blocks.{i}."
        sd[b + "norm_1.weight"] = src[a + "input_layernorm.weight"]
        sd[b + "norm_2.weight"] = src[a + "post_attention_layernorm.weight"]
        sd[b + "attn.Wqkv.weight"] = torch.cat([src[a + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        sd[b + "attn.out_proj.weight"] = src[a + "self_attn.o_proj.weight"]
        for n in ("gate", "up", "down"):
            sd[b + f"ffn.{n}_proj.weight"] = src[a + f"mlp.{n}_proj.weight"]
    ours.load_state_dict(sd, strict=True)
    x = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, llama(x).logits, atol=1e-5, rtol=1e-5)
