"""MPT attention: ALiBi slopes, the mask each query sees, the attention module, and the reference kernels.

Notation (shape names used in comments):
    B batch, H query heads, K key/value heads (GQA: H % K == 0), T query length, S key length, D head dim.

One semantics, several kernels. The module computes q, k, v and hands them to the `AttentionKernel` of the
`AttentionPlan` it is given; this file holds the two that are plain PyTorch:
    eager   explicit softmax; the readable reference every other kernel is tested against
    sdpa    F.scaled_dot_product_attention with the ALiBi bias and the mask folded into one additive bias
The fast paths (FlexAttention, cuDNN's flash attention with ALiBi, the Triton decode kernel) live in
smalto/kernels/, which chooses one plan per mode (train, prefill, decode, score) with its reason and applies it
from outside (`smalto.kernels.apply`). A model no plan was applied to runs `reference_plan(config)`.

Positions are "key coordinates": with a KV cache the keys are the S slots of the cache and the queries sit at
`q_pos` (T,) inside them. A query always sees itself, so no softmax row is ever empty (padding rows stay finite).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.model.config import MPTConfig
from smalto.model.layers import build_norm
from smalto.model.rope import apply_rope, rope_cos_sin


def alibi_slopes(n_heads: int, alibi_bias_max: int = 8, device: torch.device | str | None = None) -> Tensor:
    """ALiBi head slopes (Press et al. 2022), as MPT computes them for any head count.

    For n a power of two: 2^(-alibi_bias_max * h / n), h = 1..n. Otherwise the slopes of the next power of two
    m are taken odd-indexed first, then even-indexed, and cut to n (equal to the paper's interleaving for bias max 8).
    """
    m = 2 ** math.ceil(math.log2(n_heads))
    exps = torch.arange(1, m + 1, dtype=torch.float32, device=device) * (alibi_bias_max / m)
    slopes = 1.0 / torch.pow(2.0, exps)
    if m != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


# ---------------------------------------------------------------- what each query may see


@dataclass
class AttentionMask:
    """Everything that decides which keys a query sees and how ALiBi biases them; built once per forward.

    q_pos:      (T,) long, the queries' positions among the S keys
    n_keys:     S
    key_valid:  (B, S) bool or None: False for padding keys
    seq_q/seq_k:(B, T)/(B, S) long or None: packed-document ids; attention stays inside a document
    window:     sliding window size (-1 = none): a query sees keys with q - k < window
    from_zero:  q_pos is known to be arange(T) (no cache)
    """

    q_pos: Tensor
    n_keys: int
    key_valid: Tensor | None = None
    seq_q: Tensor | None = None
    seq_k: Tensor | None = None
    window: int = -1
    from_zero: bool = False  # q_pos is arange(T) (no cache): kernels may use the query index itself

    _dense: Tensor | None = field(default=None, repr=False, compare=False)

    def rows(self, start: int, end: int) -> AttentionMask:
        """The mask of queries start..end-1 only (same keys)."""
        return AttentionMask(
            q_pos=self.q_pos[start:end],
            n_keys=self.n_keys,
            key_valid=self.key_valid,
            seq_q=self.seq_q[:, start:end] if self.seq_q is not None else None,
            seq_k=self.seq_k,
            window=self.window,
            from_zero=self.from_zero and start == 0,
        )

    @property
    def causal_only(self) -> bool:
        """Nothing but causality (and the cache's unwritten slots) hides keys: no padding, documents or window."""
        return self.key_valid is None and self.seq_q is None and self.window <= 0

    def bias_rows(self) -> int:
        """The batch rows of the dense mask and of SDPA's bias: B when it depends on the row, else 1."""
        per_row = self.key_valid if self.key_valid is not None else self.seq_q
        return per_row.shape[0] if per_row is not None else 1

    @property
    def dense(self) -> Tensor:
        """(B|1, 1, T, S) bool: True where the query may attend (memoised by hand: functools.cached_property takes
        an RLock on Python 3.11, which torch.compile cannot trace, so a fullgraph decode step would not compile)."""
        if self._dense is None:
            self._dense = self._build_dense()
        return self._dense

    def _build_dense(self) -> Tensor:
        k = torch.arange(self.n_keys, device=self.q_pos.device)
        q = self.q_pos[:, None]
        allowed = k[None, :] <= q
        if self.window > 0:
            allowed = allowed & (q - k[None, :] < self.window)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if self.seq_q is not None and self.seq_k is not None:
            allowed = allowed & (self.seq_q[:, None, :, None] == self.seq_k[:, None, None, :])
        if self.key_valid is not None:
            allowed = allowed & (self.key_valid[:, None, None, :] | (k[None, :] == q)[None, None])
        return allowed

    def alibi(self, slopes: Tensor) -> Tensor:
        """(1, H, T, S) float32: slope_h * (k - q), zero on the diagonal and negative into the past."""
        k = torch.arange(self.n_keys, device=self.q_pos.device, dtype=torch.float32)
        dist = k[None, :] - self.q_pos[:, None].to(torch.float32)
        return (slopes[:, None, None] * dist[None])[None]


# ---------------------------------------------------------------- kernels


def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    slopes: Tensor | None,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """The reference: softmax(q k^T * scale + alibi, masked) v, softmax in float32. q (B,H,T,D), k/v (B,K,S,D)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, T, S)
    if slopes is not None:
        scores = scores + mask.alibi(slopes)
    scores = scores.masked_fill(~mask.dense, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    slopes: Tensor | None,
    scale: float,
    dropout_p: float,
    bias: Tensor | None,
) -> Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # enable_gqa is not taken by every fused kernel; the copy is cheap next to the matmuls
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if bias is None:  # plain causal attention: let SDPA pick flash attention
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def sdpa_bias(mask: AttentionMask, slopes: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The additive bias SDPA takes, shared by all blocks of one forward; None means plain causal."""
    if _bias_free(mask, slopes):
        return None
    neg = torch.finfo(dtype).min
    alibi = mask.alibi(slopes) if slopes is not None else torch.zeros((), device=mask.q_pos.device)
    return torch.where(mask.dense, alibi, neg).to(dtype)


def _bias_free(mask: AttentionMask, slopes: Tensor | None) -> bool:
    """Plain causal self-attention without ALiBi: SDPA's own causal kernel needs no bias."""
    return slopes is None and mask.causal_only and mask.q_pos.numel() == mask.n_keys


# Elements of the one additive bias SDPA is given (rows·H·T·S): 2^30 is 2 GiB in bf16. A longer input (a long
# StoryWriter prompt: T = S = 16k, 32 heads is 8.6e9) runs its queries in chunks, each with its own slice of the bias.
SDPA_BIAS_BUDGET = 2**30


def sdpa_query_chunk(mask: AttentionMask, n_heads: int, slopes: Tensor | None) -> int | None:
    """Query rows per chunk when the whole bias would exceed SDPA_BIAS_BUDGET; None when it fits (or is not needed)."""
    per_query = mask.bias_rows() * n_heads * mask.n_keys
    if mask.q_pos.numel() * per_query <= SDPA_BIAS_BUDGET:
        return None
    if _bias_free(mask, slopes):
        return None
    return max(1, SDPA_BIAS_BUDGET // per_query)


def sdpa_attention_in_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    slopes: Tensor | None,
    scale: float,
    dropout_p: float,
    chunk: int,
) -> Tensor:
    """SDPA over the queries `chunk` at a time, each chunk with its own bias: memory bounded by SDPA_BIAS_BUDGET."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # GQA: expand the keys/values once, not once per chunk
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    outs = []
    for start in range(0, q.shape[2], chunk):
        end = min(start + chunk, q.shape[2])
        rows = mask.rows(start, end)
        bias = sdpa_bias(rows, slopes, q.dtype)
        outs.append(sdpa_attention(q[:, :, start:end], k, v, rows, slopes, scale, dropout_p, bias))
    return torch.cat(outs, dim=2)


# ---------------------------------------------------------------- plans: which kernel computes attention


@dataclass(frozen=True)
class AttentionKernel:
    """One way to compute attention.

    prepare(config, mask, slopes, dtype) runs once per forward and returns the state all blocks share (an additive
    bias, a block mask); attend(q, k, v, qkv, inputs, scale, dropout_p) computes one block's attention: q (B,H,T,D),
    k/v (B,K,S,D), qkv the packed projection (B, T, (H+2K)·D) while q, k, v are still plain views of it (else None)
    → (B, H, T, D). accepts(mask) says whether the kernel computes that mask (None: every mask)."""

    name: str
    attend: Callable[..., Tensor]
    prepare: Callable[..., Any] | None = None
    accepts: Callable[[AttentionMask], bool] | None = None


@dataclass(frozen=True)
class AttentionPlan:
    """The kernel one mode runs and why it was chosen; `fallback` computes the forwards whose mask `kernel` does
    not accept (cuDNN's causal kernel → FlexAttention for padded or packed batches)."""

    kernel: AttentionKernel
    reason: str
    fallback: AttentionKernel | None = None

    @property
    def name(self) -> str:
        extra = f" ({self.fallback.name} for masked batches)" if self.fallback is not None else ""
        return self.kernel.name + extra

    def kernel_for(self, mask: AttentionMask) -> AttentionKernel:
        k = self.kernel
        if k.accepts is None or k.accepts(mask):
            return k
        if self.fallback is None:
            raise ValueError(
                f"attention kernel {k.name!r} cannot compute this mask and its plan has no fallback"
            )
        return self.fallback


def _eager(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float) -> Tensor:
    return eager_attention(q, k, v, inputs.mask, inputs.slopes, scale, dropout_p)


def _sdpa_prepare(config: MPTConfig, mask: AttentionMask, slopes: Tensor | None, dtype: torch.dtype):
    """(bias, None), or (None, rows per chunk) when the whole bias would exceed SDPA_BIAS_BUDGET."""
    chunk = sdpa_query_chunk(mask, config.n_heads, slopes)
    return (None, chunk) if chunk is not None else (sdpa_bias(mask, slopes, dtype), None)


def _sdpa(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float) -> Tensor:
    bias, chunk = inputs.state
    if chunk is not None:
        return sdpa_attention_in_chunks(q, k, v, inputs.mask, inputs.slopes, scale, dropout_p, chunk)
    return sdpa_attention(q, k, v, inputs.mask, inputs.slopes, scale, dropout_p, bias)


EAGER = AttentionKernel("eager", _eager)
SDPA = AttentionKernel("sdpa", _sdpa, prepare=_sdpa_prepare)


def reference_plan(config: MPTConfig) -> AttentionPlan:
    """What a model runs when no plan was applied to it: `eager` when the config asks for it, else SDPA."""
    if config.attn_config.attn_impl == "eager":
        return AttentionPlan(EAGER, "attn_impl: eager")
    return AttentionPlan(SDPA, "no kernels applied (smalto.kernels.apply chooses them)")


@dataclass
class AttentionInputs:
    """Per-forward attention state shared by every block (built once in MPTModel.forward)."""

    mask: AttentionMask
    kernel: AttentionKernel
    slopes: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    state: Any = field(default=None, repr=False)  # the kernel's `prepare` result


def build_attention_inputs(
    config: MPTConfig, mask: AttentionMask, plan: AttentionPlan, dtype: torch.dtype
) -> AttentionInputs:
    a = config.attn_config
    device = mask.q_pos.device
    slopes = alibi_slopes(config.n_heads, a.alibi_bias_max, device=device) if a.alibi else None
    rope = rope_cos_sin(mask.q_pos, config.head_dim, a.rope_theta, a.rope_scaling) if a.rope else None
    kernel = plan.kernel_for(mask)
    state = kernel.prepare(config, mask, slopes, dtype) if kernel.prepare is not None else None
    return AttentionInputs(mask=mask, kernel=kernel, slopes=slopes, rope=rope, state=state)


# ---------------------------------------------------------------- the module


class MPTAttention(nn.Module):
    """Fused QKV projection (rows Q|K|V), optional clip and QK-norm, RoPE or ALiBi, attention, output projection."""

    def __init__(self, config: MPTConfig, device: torch.device | str | None = None):
        super().__init__()
        a = config.attn_config
        self.n_heads, self.kv_n_heads, self.head_dim = config.n_heads, config.kv_n_heads, config.head_dim
        self.d_model = config.d_model
        self.softmax_scale = config.softmax_scale
        self.clip_qkv = a.clip_qkv
        self.attn_pdrop = a.attn_pdrop
        q_dim, kv_dim = (
            self.n_heads * self.head_dim,
            self.kv_n_heads * self.head_dim,
        )  # q_dim: d_model by default
        bias = config.attn_bias
        self.Wqkv = nn.Linear(self.d_model, q_dim + 2 * kv_dim, bias=bias, device=device)
        self.Wqkv._fused = (0, [q_dim, q_dim + kv_dim])  # type: ignore[assignment]  # split points for init
        self.q_ln = self.k_ln = None
        if a.qk_ln:
            self.q_ln = build_norm(config, q_dim, device)
            self.k_ln = build_norm(config, kv_dim, device)
        elif a.qk_gn:
            self.q_ln = build_norm(config, self.head_dim, device)
            self.k_ln = build_norm(config, self.head_dim, device)
        self.qk_gn = a.qk_gn
        self.out_proj = nn.Linear(q_dim, self.d_model, bias=bias, device=device)
        self.out_proj._is_residual = True  # type: ignore[assignment]  # init scales it (init.py)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache=None, layer_idx: int = 0) -> Tensor:
        return self.out_proj(self.attend(self.Wqkv(x), inputs, cache, layer_idx))

    def attend(self, qkv: Tensor, inputs: AttentionInputs, cache=None, layer_idx: int = 0) -> Tensor:
        """The packed projection (B, T, (H+2K)·D) → attention output (B, T, H·D), before out_proj."""
        B, T, _ = qkv.shape
        H, K, D = self.n_heads, self.kv_n_heads, self.head_dim
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        packed: Tensor | None = qkv
        if self.q_ln is not None and self.k_ln is not None:
            dtype = q.dtype
            if self.qk_gn:  # norm each head separately
                q = self.q_ln(q.view(B, T, H, D)).view(B, T, H * D)
                k = self.k_ln(k.view(B, T, K, D)).view(B, T, K * D)
            else:
                q, k = self.q_ln(q), self.k_ln(k)
            q, k, packed = q.to(dtype), k.to(dtype), None
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            q, k, packed = apply_rope(q, cos, sin), apply_rope(k, cos, sin), None
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, inputs.mask.q_pos)  # (B, K, S, D)
            packed = None
        p = self.attn_pdrop if self.training else 0.0
        y = inputs.kernel.attend(q, k, v, packed, inputs, self.softmax_scale, p)
        return y.transpose(1, 2).reshape(B, T, H * D)
