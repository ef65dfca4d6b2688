"""MPT attention: ALiBi slopes, the mask each query sees, one attention module, three kernels.

Notation (shape names used in comments):
    B batch, H query heads, K key/value heads (GQA: H % K == 0), T query length, S key length, D head dim.

One semantics, four kernels (and a fifth for decoding), chosen by `attn_impl` in `resolve_attn_impl` (the only
place that decides):
    eager   explicit softmax; the readable reference every other kernel is tested against
    sdpa    F.scaled_dot_product_attention with the ALiBi bias and the mask folded into one additive bias
    flex    FlexAttention: ALiBi as a `score_mod`, the mask as a block mask (sparse: skips masked tiles); GPU training
    cudnn   cuDNN's flash attention with its own ALiBi (`cudnn_attention.py`, optional package): GPU training of
            plain causal batches, faster than flex; `auto` takes it when it applies, flex otherwise
    decode  one query per row against the KV cache in a Triton kernel (`decode_attention.py`): `auto` for a
            compiled decode step on CUDA when rows × heads fill the GPU (batched decoding)

Positions are "key coordinates": with a KV cache the keys are the S slots of the cache and the queries sit at
`q_pos` (T,) inside them. A query always sees itself, so no softmax row is ever empty (padding rows stay finite).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.errors import ConfigError
from smalto.model import cudnn_attention as cudnn_kernel
from smalto.model import decode_attention as decode_kernel
from smalto.model.config import MPTConfig
from smalto.model.layers import Linear, build_norm


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


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


@functools.cache
def _compiled_flex():
    flex_attention, _ = _flex()
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask: AttentionMask, n_heads: int):
    """The block mask for FlexAttention (tiles that are fully masked are skipped)."""
    _, create_block_mask = _flex()
    q_pos, window, valid, seq_q, seq_k = mask.q_pos, mask.window, mask.key_valid, mask.seq_q, mask.seq_k
    from_zero = mask.from_zero
    key = (
        (q_pos.numel(), mask.n_keys, window, q_pos.device)
        if from_zero and valid is None and seq_q is None
        else None
    )
    if key is not None and key in _BLOCK_MASKS:  # plain causal (+ window): the same mask every training step
        return _BLOCK_MASKS[key]

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx if from_zero else q_pos[q_idx]
        ok = kv_idx <= q
        if window > 0:
            ok = ok & (q - kv_idx < window)
        if seq_q is not None and seq_k is not None:
            ok = ok & (seq_q[b, q_idx] == seq_k[b, kv_idx])
        if valid is not None:
            ok = ok & (valid[b, kv_idx] | (kv_idx == q))
        return ok

    batch = None if valid is None and seq_q is None else (valid if valid is not None else seq_q).shape[0]  # type: ignore[union-attr]
    block_mask = create_block_mask(
        mask_mod, batch, None, q_pos.numel(), mask.n_keys, device=q_pos.device, _compile=q_pos.is_cuda
    )
    if key is not None:
        _BLOCK_MASKS[key] = block_mask
    return block_mask


_BLOCK_MASKS: dict[tuple, object] = {}


def flex_attention_fn(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, slopes: Tensor | None, scale: float, block_mask
) -> Tensor:
    flex_attention, _ = _flex()
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    score_mod = None
    if slopes is not None:
        q_pos, from_zero = mask.q_pos, mask.from_zero

        def score_mod(score, b, h, q_idx, kv_idx):
            q = q_idx if from_zero else q_pos[q_idx]
            return score + slopes[h] * (kv_idx - q).to(score.dtype)

    enable_gqa = q.shape[1] != k.shape[1]
    options = None
    if q.is_cuda and mask.causal_only:
        # plain causal: the kernel may assume every row has a visible key in each tile it visits and that a
        # row's tiles form runs (≈ 4% faster fwd+bwd, bench/bench_attention.py). Windows and documents break
        # both (a row can be fully masked in a window's edge tile): the tests on CUDA fail with these hints on
        options = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
    return fn(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=enable_gqa,
        kernel_options=options,
    )


def resolve_attn_impl(
    impl: str,
    *,
    device: torch.device,
    training: bool,
    dropout: bool,
    decode: bool,
    head_dim: int = 0,
    n_keys: int = 0,
    programs: int = 0,
    cudnn_unsupported: Callable[[], str | None] = lambda: "not asked",
) -> str:
    """The one place that maps `attn_impl` to a kernel, refusing impossible combinations with the reason.

    `cudnn_unsupported()` says why cuDNN's kernel cannot compute this forward (None: it can); asked only for a
    training forward on CUDA, where it and FlexAttention are the candidates."""
    backward = training and torch.is_grad_enabled() and not decode
    if impl == "cudnn":
        if not backward:  # cuDNN is the training kernel; inference takes what `auto` takes
            impl = "auto"
        else:
            reason = cudnn_unsupported()
            if reason is not None and not reason.startswith(cudnn_kernel.MASK_REASON):
                raise ConfigError(f"attn_impl 'cudnn' cannot train this model: {reason}")
            return "cudnn" if reason is None else "flex"
    if impl == "auto":
        if decode and decode_kernel.supports(head_dim, n_keys, programs, device):
            return "decode"
        # flex compiles one kernel per shape: right for training (fixed shapes), wrong for inference, whose
        # lengths change with every request (a recompile each time, then the unfused fallback)
        if backward and device.type == "cuda" and not dropout:
            return "cudnn" if cudnn_unsupported() is None else "flex"
        return "sdpa"
    if impl == "flex":
        if dropout and training:
            raise ConfigError(
                "attn_impl 'flex' has no attention dropout; set attn_config.attn_pdrop 0 or use 'sdpa'"
            )
        if training and device.type != "cuda" and torch.is_grad_enabled():
            raise ConfigError("attn_impl 'flex' has no backward on CPU; train on CPU with 'sdpa' (or 'auto')")
    return impl


# ---------------------------------------------------------------- rotary positions (the alternative to ALiBi)


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, D) for the non-interleaved (GPT-NeoX / HF `rotate_half`) layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    freqs = pos.to(torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------- the module


@dataclass
class AttentionInputs:
    """Per-forward attention state shared by every block (built once in MPTModel.forward)."""

    mask: AttentionMask
    impl: str
    slopes: Tensor | None = None
    rope: tuple[Tensor, Tensor] | None = None
    bias: Tensor | None = None  # sdpa only
    sdpa_chunk: int | None = None  # sdpa only: query rows per chunk when the whole bias would be too large
    block_mask: object | None = None  # flex only


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
        kv_dim = self.kv_n_heads * self.head_dim
        bias = not config.no_bias
        self.Wqkv = Linear(self.d_model, self.d_model + 2 * kv_dim, bias=bias, device=device)
        self.Wqkv._fused = (0, [self.d_model, self.d_model + kv_dim])  # type: ignore[assignment]  # split points for init
        self.q_ln = self.k_ln = None
        if a.qk_ln:
            self.q_ln = build_norm(config, self.d_model, device)
            self.k_ln = build_norm(config, kv_dim, device)
        elif a.qk_gn:
            self.q_ln = build_norm(config, self.head_dim, device)
            self.k_ln = build_norm(config, self.head_dim, device)
        self.qk_gn = a.qk_gn
        self.out_proj = Linear(self.d_model, self.d_model, bias=bias, device=device)
        self.out_proj._is_residual = True  # type: ignore[assignment]

    def forward(
        self,
        x: Tensor,
        inputs: AttentionInputs,
        cache=None,
        layer_idx: int = 0,
        norm: nn.Module | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """`norm` (applied to x first) and `residual` (added to the output): see `Linear`."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.kv_n_heads, self.head_dim
        qkv = self.Wqkv(x, norm)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        if self.q_ln is not None and self.k_ln is not None:
            dtype = q.dtype
            if self.qk_gn:  # norm each head separately
                q = self.q_ln(q.view(B, T, H, D)).view(B, T, H * D)
                k = self.k_ln(k.view(B, T, K, D)).view(B, T, K * D)
            else:
                q, k = self.q_ln(q), self.k_ln(k)
            q, k = q.to(dtype), k.to(dtype)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v, inputs.mask.q_pos)  # (B, K, S, D)
        p = self.attn_pdrop if self.training else 0.0
        if inputs.impl == "eager":
            y = eager_attention(q, k, v, inputs.mask, inputs.slopes, self.softmax_scale, p)
        elif inputs.impl == "sdpa" and inputs.sdpa_chunk is not None:
            m, chunk = inputs.mask, inputs.sdpa_chunk
            y = sdpa_attention_in_chunks(q, k, v, m, inputs.slopes, self.softmax_scale, p, chunk)
        elif inputs.impl == "sdpa":
            y = sdpa_attention(q, k, v, inputs.mask, inputs.slopes, self.softmax_scale, p, inputs.bias)
        elif inputs.impl == "cudnn":  # the packed projection in, its gradient packed out: no concatenation
            if self.q_ln is not None or inputs.rope is not None:
                qkv = torch.cat([t.transpose(1, 2).reshape(B, T, -1) for t in (q, k, v)], dim=-1)
            y = cudnn_kernel.cudnn_attention(qkv, H, K, inputs.slopes is not None, self.softmax_scale)
        elif inputs.impl == "decode":
            m = inputs.mask
            y = decode_kernel.decode_attention(
                q, k, v, m.q_pos, inputs.slopes, m.key_valid, self.softmax_scale, m.window
            )
        else:
            y = flex_attention_fn(q, k, v, inputs.mask, inputs.slopes, self.softmax_scale, inputs.block_mask)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.out_proj(y, residual=residual)


def build_attention_inputs(
    config: MPTConfig, mask: AttentionMask, *, impl: str, dtype: torch.dtype
) -> AttentionInputs:
    a = config.attn_config
    device = mask.q_pos.device
    slopes = alibi_slopes(config.n_heads, a.alibi_bias_max, device=device) if a.alibi else None
    rope = rope_cos_sin(mask.q_pos, config.head_dim, a.rope_theta) if a.rope else None
    inputs = AttentionInputs(mask=mask, impl=impl, slopes=slopes, rope=rope)
    if impl == "sdpa":
        inputs.sdpa_chunk = sdpa_query_chunk(mask, config.n_heads, slopes)
        if inputs.sdpa_chunk is None:
            inputs.bias = sdpa_bias(mask, slopes, dtype)
    elif impl == "flex":
        inputs.block_mask = flex_block_mask(mask, config.n_heads)
    return inputs
