"""MPT for `trust_remote_code` loading (copied by smalto into every saved model folder).

Self-contained: imports only torch and transformers (>= 4.40, 5.x included), never smalto. It computes what
smalto's `MPTForCausalLM` computes: ALiBi or RoPE or learned positions, multi-head / grouped-query / multi-query
attention, qk_ln / qk_gn, clip_qkv, softmax_scale, sliding window, MLP or GLU, LayerNorm or RMSNorm, tied or
untied unembedding, logit_scale. Parameter names are those of the mosaicml/mpt-* checkpoints.

`attn_config['attn_impl']`: `torch` / `eager` run the explicit softmax; `flash`, `triton`, `sdpa`, `flex`, `cudnn`,
`auto` run `scaled_dot_product_attention` (with ALiBi folded into its bias). The cache is whatever `generate()` passes:
a transformers `Cache` (4.36+, always in 5.x) or the legacy tuple of (k, v) per layer.

Shapes: B batch, T new tokens, S keys (past + new), H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mpt import MPTConfig, SmaltoMPTConfig, resolve

KERNELS = {
    "torch": "eager",
    "eager": "eager",
    "flash": "sdpa",
    "triton": "sdpa",
    "sdpa": "sdpa",
    "flex": "sdpa",
    "cudnn": "sdpa",
    "auto": "sdpa",
}


def alibi_slopes(n_heads: int, bias_max: float, device: torch.device) -> Tensor:
    m = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2.0, torch.arange(1, m + 1, dtype=torch.float32, device=device) * (bias_max / m))
    if m != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def build_norm(s: SimpleNamespace, dim: int) -> nn.Module:
    if s.norm_type.endswith("rmsnorm"):
        return RMSNorm(dim, s.norm_eps)
    return nn.LayerNorm(dim, eps=s.norm_eps, bias=not s.no_bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class MPTAttention(nn.Module):
    def __init__(self, s: SimpleNamespace, layer_idx: int):
        super().__init__()
        a = s.attn
        self.layer_idx = layer_idx
        self.H, self.D = s.n_heads, s.d_model // s.n_heads
        self.K = a["kv_n_heads"] or s.n_heads
        self.scale = a["softmax_scale"] or 1.0 / math.sqrt(self.D)
        self.clip_qkv, self.qk_gn, self.pdrop = a["clip_qkv"], a["qk_gn"], a["attn_pdrop"]
        bias = not s.no_bias
        self.Wqkv = nn.Linear(s.d_model, (self.H + 2 * self.K) * self.D, bias=bias)
        if a["qk_ln"]:
            self.q_ln, self.k_ln = build_norm(s, self.H * self.D), build_norm(s, self.K * self.D)
        elif a["qk_gn"]:
            self.q_ln, self.k_ln = build_norm(s, self.D), build_norm(s, self.D)
        self.out_proj = nn.Linear(s.d_model, s.d_model, bias=bias)

    def forward(self, x: Tensor, ctx: dict[str, Any], past: Any) -> tuple[Tensor, Any]:
        B, T, _ = x.shape
        H, K, D = self.H, self.K, self.D
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        if hasattr(self, "q_ln"):
            dtype = q.dtype
            if self.qk_gn:
                q, k = (
                    self.q_ln(q.view(B, T, H, D)).view(B, T, H * D),
                    self.k_ln(k.view(B, T, K, D)).view(B, T, K * D),
                )
            else:
                q, k = self.q_ln(q), self.k_ln(k)
            q, k = q.to(dtype), k.to(dtype)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, D)
        if ctx["rope"] is not None:
            cos, sin = ctx["rope"]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if past is not None and hasattr(past, "update"):  # a transformers Cache
            k, v = past.update(k, v, self.layer_idx)
            present = past
        else:  # legacy tuple cache
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            present = (k, v)
        if K != H:
            k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
        p = self.pdrop if self.training else 0.0
        allowed, alibi = ctx["allowed"], ctx["alibi"]  # (B|1, 1, T, S) bool, (1, H, T, S) float32 or None
        if ctx["kernel"] == "eager":
            scores = (q @ k.transpose(-2, -1)).float() * self.scale
            if alibi is not None:
                scores = scores + alibi
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
            y = F.dropout(probs, p=p, training=self.training) @ v
        else:
            bias = torch.where(allowed, alibi if alibi is not None else 0.0, torch.finfo(q.dtype).min).to(
                q.dtype
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * D)), present


class MPTMLP(nn.Module):
    def __init__(self, s: SimpleNamespace):
        super().__init__()
        f = s.ffn
        hidden = f["ffn_hidden_size"] or int(s.d_model * s.expansion_ratio)
        bias = not s.no_bias
        self.up_proj = nn.Linear(s.d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, s.d_model, bias=bias)
        if f["ffn_type"] == "mptglu":
            self.gate_proj = nn.Linear(s.d_model, hidden, bias=bias)
        act = f["ffn_act_fn"] or {"name": "gelu"}
        name, approx = act.get("name", "gelu"), act.get("approximate", "none")
        if name == "gelu_tanh":
            name, approx = "gelu", "tanh"
        self.act = {"gelu": nn.GELU(approximate=approx), "silu": nn.SiLU(), "relu": nn.ReLU()}[name]

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class MPTBlock(nn.Module):
    def __init__(self, s: SimpleNamespace, layer_idx: int):
        super().__init__()
        self.norm_1 = build_norm(s, s.d_model)
        self.attn = MPTAttention(s, layer_idx)
        self.norm_2 = build_norm(s, s.d_model)
        self.ffn = MPTMLP(s)
        self.drop = nn.Dropout(s.resid_pdrop)

    def forward(self, x: Tensor, ctx: dict[str, Any], past: Any) -> tuple[Tensor, Any]:
        a, present = self.attn(self.norm_1(x), ctx, past)
        x = x + self.drop(a)
        return x + self.drop(self.ffn(self.norm_2(x))), present


class MPTPreTrainedModel(PreTrainedModel):
    config_class = MPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["MPTBlock"]  # noqa: RUF012
    supports_gradient_checkpointing = False
    _supports_cache_class = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # only reached for weights a checkpoint lacks (or a freshly built model); loading never re-initialises
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()  # type: ignore[union-attr]
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()  # type: ignore[union-attr]


class MPTModel(MPTPreTrainedModel):
    def __init__(self, config: MPTConfig):
        super().__init__(config)
        s = resolve(config)
        self.uses_wpe = s.learned_pos_emb and not (s.attn["alibi"] or s.attn["rope"])
        self.wte = nn.Embedding(s.vocab_size, s.d_model)
        if self.uses_wpe:
            self.wpe = nn.Embedding(s.max_seq_len, s.d_model)
        self.emb_drop = nn.Dropout(s.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(s, i) for i in range(s.n_layers))
        self.norm_f = build_norm(s, s.d_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def _context(
        self, B: int, T: int, past_len: int, attention_mask: Tensor | None, device: torch.device
    ) -> dict:
        """Mask, ALiBi and RoPE shared by every block; keys are the past + new tokens."""
        c = resolve(self.config)  # read at every call: attn_impl / max_seq_len may be edited after loading
        a = c.attn
        kernel = KERNELS.get(a["attn_impl"])
        if kernel is None:
            raise ValueError(f"attn_config.attn_impl = {a['attn_impl']!r}; use one of {sorted(KERNELS)}")
        S = past_len + T
        if S > c.max_seq_len:
            raise ValueError(
                f"{S} tokens exceed max_seq_len ({c.max_seq_len}); raise config.max_seq_len (ALiBi and "
                "RoPE models can run past their trained length)"
            )
        q_pos, k_pos = torch.arange(past_len, S, device=device), torch.arange(S, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
        if a["sliding_window_size"] > 0:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < a["sliding_window_size"])
        if attention_mask is not None:
            valid = attention_mask[:, -S:].to(device=device, dtype=torch.bool)
            allowed = allowed & (valid[:, None, None, :] | (k_pos[None, :] == q_pos[:, None])[None, None])
            # positions count from each row's first real token (left padding)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        else:
            pos = q_pos[None, :].expand(B, T)
        alibi = rope = None
        if a["alibi"]:
            slopes = alibi_slopes(c.n_heads, a["alibi_bias_max"], device)
            alibi = (slopes[:, None, None] * (k_pos[None, :] - q_pos[:, None]).float()[None])[None]
        if a["rope"]:
            D = c.d_model // c.n_heads
            inv = 1.0 / (a["rope_theta"] ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
            freqs = pos.float()[..., None] * inv  # (B, T, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
            rope = (emb.cos(), emb.sin())
        return {"kernel": kernel, "allowed": allowed, "alibi": alibi, "rope": rope, "pos": pos}

    def forward(
        self,
        input_ids: Tensor,
        past_key_values: Any = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Any]:
        B, T = input_ids.shape
        past_len = _past_length(past_key_values)
        ctx = self._context(B, T, past_len, attention_mask, input_ids.device)
        x = self.wte(input_ids)
        frac = resolve(self.config).embedding_fraction
        if frac < 1.0:  # scales the embedding's gradient only
            x = x * frac + x.detach() * (1 - frac)
        if self.uses_wpe:
            x = x + self.wpe(ctx["pos"])
        x = self.emb_drop(x)
        is_cache_object = past_key_values is not None and hasattr(past_key_values, "update")
        presents = []
        for i, block in enumerate(self.blocks):
            past = past_key_values if is_cache_object else (past_key_values[i] if past_key_values else None)
            x, present = block(x, ctx, past)
            presents.append(present)
        cache = past_key_values if is_cache_object else (tuple(presents) if use_cache else None)
        return self.norm_f(x), cache


def _past_length(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return past[0][0].shape[2] if len(past) else 0


class MPTForCausalLM(MPTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MPTConfig):
        super().__init__(config)
        self.transformer = MPTModel(config)
        s = resolve(config)
        if not s.tie_word_embeddings:
            self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loading, then `config.init_device` (e.g. 'cuda:0') honoured as where the model lands."""
        out = super().from_pretrained(*args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        device = str(resolve(model.config).init_device)
        if kwargs.get("device_map") is None and device not in ("cpu", "meta", "mixed"):
            model.to(device)
        return out

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module | None:
        # a tied model has no lm_head: it multiplies by wte.weight, so no version-specific tying is needed
        return getattr(self, "lm_head", None)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        past_key_values: Any = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        s = resolve(self.config)
        use_cache = s.use_cache if use_cache is None else use_cache
        h, cache = self.transformer(input_ids, past_key_values, attention_mask, use_cache=bool(use_cache))
        w = self.lm_head.weight if hasattr(self, "lm_head") else self.transformer.wte.weight
        logits = F.linear(h, w)
        ls = s.logit_scale
        if ls is not None:
            logits = logits * (1.0 / math.sqrt(s.d_model) if ls == "inv_sqrt_d_model" else float(ls))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        past_key_values: Any = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # feed only the tokens the cache has not seen (same in transformers 4.40 and 5.x)
        past_len = _past_length(past_key_values)
        if past_len:
            input_ids = input_ids[:, past_len:]
        return {
            "input_ids": input_ids,
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }

    @staticmethod
    def _reorder_cache(past: Any, beam_idx: Tensor) -> Any:
        if hasattr(past, "reorder_cache"):
            past.reorder_cache(beam_idx)
            return past
        return tuple(
            (k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
            for k, v in past
        )


class SmaltoMPTForCausalLM(MPTForCausalLM):
    """The same model, for folders whose config.json says model_type `smalto_mpt` (not loadable natively)."""

    config_class = SmaltoMPTConfig
