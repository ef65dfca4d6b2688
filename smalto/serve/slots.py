"""The KV memory of the server: one static cache of `max_batch` slots, each slot one sequence with its own positions.

A sequence owns a slot (a row of the cache) from admission to its last token. Its prompt is written from
position 0 by `prefill` (in chunks: a chunk is a forward of one row over a view of that row), and each decode
step writes one token per slot at that slot's own position. So every sequence sees exactly the positions a
batch-1 `smalto generate` gives it (ALiBi distances, RoPE angles, learned positions), whatever else is running.

The decode step runs the model's own blocks with attention inputs built here: the query positions are one per
row (B,), the cache writes each row at its position, and attention sees keys 0..pos[b] of row b: on CUDA the
Triton decode kernel (smalto/kernels/decode_attention.py, which reads each row's own length only) when rows × heads
fill the GPU, else SDPA with a per-row mask and ALiBi bias. The step's
shapes never change (all `max_batch` rows run; an idle row writes to a scratch slot past `max_seq_len` that no
sequence reads), so on CUDA it is compiled once with `mode="reduce-overhead"` (a CUDA graph), like the decoder of
`smalto generate`, whose fused decode blocks and decode-linear unembedding it reuses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from smalto.kernels import DecodeOptions, decode_attention, decode_linear, select
from smalto.kernels.decode_block import decode_blocks
from smalto.model.attention import (
    AttentionInputs,
    AttentionKernel,
    AttentionMask,
    alibi_slopes,
    rope_cos_sin,
)
from smalto.model.cache import KVCache
from smalto.model.mpt import MPTForCausalLM


class SlotCache(KVCache):
    """The cache as a decode step sees it: row b is written at its own position `pos[b]` (the query positions
    of the step's `AttentionMask` are per row: (B,))."""

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.keys[layer], self.values[layer]
        rows = torch.arange(k.shape[0], device=k.device)
        k[rows, :, pos] = k_new[:, :, 0].to(k.dtype)  # (B, K, D) at (b, :, pos[b])
        v[rows, :, pos] = v_new[:, :, 0].to(v.dtype)
        return k, v


def row_view(cache: KVCache, slot: int, length: int) -> KVCache:
    """A cache over row `slot` only (views: a forward on it writes into the big cache)."""
    view = object.__new__(KVCache)
    view.keys = [k[slot : slot + 1] for k in cache.keys]
    view.values = [v[slot : slot + 1] for v in cache.values]
    view.valid = cache.valid[slot : slot + 1]
    view.max_len, view.length = cache.max_len, length
    return view


def _slot_attend(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float) -> Tensor:
    """One query per row at its own position: SDPA with the per-row bias built once per step (`inputs.state`)."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.state, scale=scale)


SLOT_ATTENTION = AttentionKernel("slot-sdpa", _slot_attend)


def slot_bias(pos: Tensor, n_keys: int, slopes: Tensor | None, window: int, dtype: torch.dtype) -> Tensor:
    """(B, H|1, 1, S) additive bias: row b sees keys 0..pos[b] (within the window), with ALiBi slope·(k − pos[b])."""
    k = torch.arange(n_keys, device=pos.device)
    dist = (k[None, :] - pos[:, None]).float()  # (B, S), ≤ 0 where visible
    allowed = dist <= 0
    if window > 0:
        allowed = allowed & (dist > -window)
    bias = (slopes[None, :, None] * dist[:, None, :]) if slopes is not None else dist[:, None, :] * 0
    bias = torch.where(allowed[:, None, :], bias, torch.finfo(dtype).min)
    return bias[:, :, None, :].to(dtype)


class SlotDecoder:
    """`max_batch` slots of `max_seq_len` positions (and a scratch one, rounded up to a multiple of 16); `prefill`
    one chunk of one slot, `step` all slots."""

    def __init__(
        self, model: MPTForCausalLM, max_batch: int, compile: bool, options: DecodeOptions | None = None
    ):
        c = model.config
        self.model, self.max_batch = model, max_batch
        self.max_len = c.max_seq_len  # positions a sequence may use; slot `max_len` is the idle rows' scratch
        # a multiple of 16 positions: SDPA's fused kernels want aligned biases
        n_slots = -(-(self.max_len + 1) // 16) * 16
        self.cache = SlotCache.for_model(c, max_batch, n_slots, model.dtype, model.device)
        kernels = compile and model.device.type == "cuda"
        self.options = o = (options or DecodeOptions()) if kernels else None
        self.attention = SLOT_ATTENTION
        if o is not None:
            decode_linear.prepare()
            # the Triton decode kernel takes a position per row, so each row reads its own tokens only
            programs = max_batch * c.n_heads
            if decode_attention.prepare() and (
                decode_attention.why_not(c.head_dim, n_slots, programs, model.device, o.programs_per_sm)
                is None
            ):
                self.attention = decode_attention.decode_kernel(o.attention_launch)
        shape = dict(device=model.device, dtype=model.dtype, batch=1, seq=n_slots, options=None)
        self.prefill_plan = select(c, "prefill", **shape)  # type: ignore[arg-type]
        self.blocks = decode_blocks(model, self.options)
        self.max_rows = self.options.linear_rows if self.options is not None else 0
        a = c.attn_config
        self.slopes = alibi_slopes(c.n_heads, a.alibi_bias_max, device=model.device) if a.alibi else None
        self.step_fn: Callable[[Tensor, Tensor], Tensor] = self._step
        self.compiled = False
        if compile:
            for t in self.cache.tensors():  # fixed addresses: CUDA graphs read them in place
                torch._dynamo.mark_static_address(t)
            self.step_fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.compiled = True

    @property
    def scratch(self) -> int:
        return self.max_len

    def _logits(self, h: Tensor) -> Tensor:
        m = self.model
        return m.scale_logits(
            decode_linear.linear_or_matmul(h, m.unembedding, max_rows=self.max_rows)
        ).float()

    def prefill(self, slot: int, ids: list[int], start: int, all_logits: bool = False) -> Tensor:
        """Write `ids` at positions start.. of `slot`; float logits of the last position (V,), or of every
        position (T, V) when `all_logits`."""
        d = self.model.device
        tokens = torch.tensor([ids], dtype=torch.long, device=d)
        pos = torch.arange(start, start + len(ids), device=d)
        view = row_view(self.cache, slot, start)
        h = self.model.transformer(tokens, None, None, view, pos, self.prefill_plan)[0]
        if all_logits:
            return self.model.scale_logits(F.linear(h, self.model.unembedding)).float()
        return self._logits(h[-1:])[0]

    def _step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """tokens (B,), pos (B,) → float logits (B, V); row b's token is written at position pos[b]."""
        m, c = self.model, self.model.config
        tr = m.transformer
        x = tr.wte(tokens[:, None])
        if c.uses_wpe:
            x = x + tr.wpe(pos.clamp(max=c.max_seq_len - 1))[:, None]
        rope = None
        if c.attn_config.rope:
            cos, sin = rope_cos_sin(pos, c.head_dim, c.attn_config.rope_theta)  # (B, D)
            rope = (cos[:, None, None, :], sin[:, None, None, :])  # broadcast over (B, H, 1, D)
        n_keys = self.cache.max_len
        mask = AttentionMask(q_pos=pos, n_keys=n_keys, window=c.attn_config.sliding_window_size)
        bias = (
            slot_bias(pos, n_keys, self.slopes, mask.window, x.dtype)
            if self.attention is SLOT_ATTENTION
            else None
        )
        inputs = AttentionInputs(mask=mask, kernel=self.attention, slopes=self.slopes, rope=rope, state=bias)
        for block in self.blocks:
            x = block(x, inputs, self.cache)
        return self._logits(tr.norm_f(x)[:, -1])

    def step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        if not self.compiled:
            return self.step_fn(tokens, pos)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.step_fn(tokens, pos)
        except Exception as e:  # a compile failure must not cost the requests their answers; it is reported
            warnings.warn(f"compiled decode failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=2)
            self.step_fn, self.compiled = self._step, False
            return self._step(tokens, pos)
