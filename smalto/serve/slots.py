"""The KV memory of the server: one static cache of `max_batch` slots, each slot one sequence with its own positions.

A sequence owns a slot (a row of the cache) from admission to its last token. Its prompt is written from
position 0 by `prefill` (in chunks: a chunk is a forward of one row over a view of that row), and each decode
step writes one token per slot at that slot's own position. So every sequence sees exactly the positions a
batch-1 `smalto generate` gives it (ALiBi distances, RoPE angles, learned positions), whatever else is running.

The decode step runs the model's own blocks with attention inputs built here: the query positions are one per
row (B,), the cache writes each row at its position, and attention sees keys 0..pos[b] of row b: on CUDA the
Triton decode kernel (smalto/kernels/decode_attention.py, which reads each row's own length only) when rows × heads
fill the GPU, else SDPA with a per-row mask and ALiBi bias.

What a step reads: its attention sees the first `n_keys` positions of every slot only (views of the cache, no
copies), `n_keys` a key-length bucket (`key_buckets`: powers of two up to the context) that the engine picks as the
smallest above the longest running sequence. An idle row (free, or still prefilling) writes its token to a
scratch position past `max_seq_len` that no sequence reads, and its query stands at position 0, so it reads one
key. Within a bucket the step's shapes never change (all `max_batch` rows run), so on CUDA it is compiled once per
bucket with `mode="reduce-overhead"` (a CUDA graph), like the decoder of `smalto generate`, whose fused decode
blocks and decode-linear unembedding it reuses. The Triton kernel reads each row up to its own position whatever
the bucket, so with it the step has one bucket (one graph): the whole slot.
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
)
from smalto.model.cache import KVCache
from smalto.model.mpt import MPTForCausalLM
from smalto.model.rope import rope_cos_sin_rows
from smalto.quant.linear import quant_head
from smalto.serve.prefill import PackedPrefill

MIN_BUCKET = 128  # the shortest key length a decode step is compiled for
MAX_BUCKETS = 7  # compiled graphs at most (under dynamo's recompile limit): longer contexts start higher


def key_buckets(max_len: int, n_slots: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Key lengths of the decode steps: `smallest`·2^i below the context, then the context (`max_len` rounded up
    to a multiple of 16, for SDPA's aligned biases; at most `n_slots`); at most MAX_BUCKETS of them."""
    last = min(-(-max_len // 16) * 16, n_slots)
    first = max(smallest, -(-last // 2 ** (MAX_BUCKETS - 1)))
    out = []
    while first < last:
        out.append(first)
        first *= 2
    return [*out, last]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`values` on the device without waiting for the work queued there (a plain host-to-device copy waits for
    the stream: the decode step in flight would finish before the next forward is queued): a pinned copy, sent
    asynchronously."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class StepCache:
    """The cache as one decode step sees it: row b writes at its own position `write_pos[b]` (in the whole
    slot: the scratch position of an idle row lies past every bucket), and attention gets the first `n_keys`
    positions of every row (views)."""

    def __init__(self, cache: KVCache, write_pos: Tensor, n_keys: int):
        self.cache, self.write_pos, self.n_keys = cache, write_pos, n_keys

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, q_pos: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.cache.keys[layer], self.cache.values[layer]
        rows = torch.arange(k.shape[0], device=k.device)
        k[rows, :, self.write_pos] = k_new[:, :, 0].to(k.dtype)  # (B, K, D) at (b, :, write_pos[b])
        v[rows, :, self.write_pos] = v_new[:, :, 0].to(v.dtype)
        return k[:, :, : self.n_keys], v[:, :, : self.n_keys]


def row_view(cache: KVCache, slot: int, length: int, n_keys: int | None = None) -> KVCache:
    """A cache over the first `n_keys` positions (default: all) of row `slot` only (views: a forward on it writes
    into the big cache)."""
    return cache.view(cache.max_len if n_keys is None else n_keys, length, slice(slot, slot + 1))


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
    one chunk of one slot, `step` all slots over the first `n_keys` positions (one of `buckets`)."""

    def __init__(
        self,
        model: MPTForCausalLM,
        max_batch: int,
        compile: bool,
        options: DecodeOptions | None = None,
        min_bucket: int = MIN_BUCKET,
        prefill_tokens: int = 2048,
    ):
        c = model.config
        self.model, self.max_batch = model, max_batch
        self.max_len = c.max_seq_len  # positions a sequence may use; slot `max_len` is the idle rows' scratch
        # a multiple of 16 positions: SDPA's fused kernels want aligned biases
        n_slots = -(-(self.max_len + 1) // 16) * 16
        self.cache = KVCache.for_model(c, max_batch, n_slots, model.dtype, model.device)
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
        self.packed = PackedPrefill(
            model,
            self.cache,
            self.prefill_plan,
            self._logits,
            scratch=self.max_len,
            max_rows=max_batch,
            max_tokens=prefill_tokens,
        )
        self.blocks = decode_blocks(model, self.options)
        self.max_rows = self.options.linear_rows if self.options is not None else 0
        self.quant_head = quant_head(model)
        a = c.attn_config
        self.slopes = alibi_slopes(c.n_heads, a.alibi_bias_max, device=model.device) if a.alibi else None
        # the Triton kernel stops at each row's position: one bucket; SDPA reads every key it is given: buckets
        self.buckets = key_buckets(self.max_len, n_slots, min_bucket)
        if self.attention is not SLOT_ATTENTION:
            self.buckets = self.buckets[-1:]
        self.step_fn: Callable[[Tensor, Tensor, int], Tensor] = self._step
        self.compiled = False
        if compile:
            for t in self.cache.tensors():  # fixed addresses: CUDA graphs read them in place
                torch._dynamo.mark_static_address(t)
            self.step_fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            self.compiled = True

    @property
    def scratch(self) -> int:
        return self.max_len

    def bucket(self, n: int) -> int:
        """The smallest bucket of at least `n` keys (the longest running sequence's position + 1)."""
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    def _logits(self, h: Tensor) -> Tensor:
        m = self.model
        if self.quant_head is not None:  # --quantize-head: the quantized linear path reads the packed matrix
            return m.scale_logits(self.quant_head.logits(h)).float()
        return m.scale_logits(
            decode_linear.linear_or_matmul(h, m.unembedding, max_rows=self.max_rows)
        ).float()

    def prefill(self, slot: int, ids: list[int], start: int, all_logits: bool = False) -> Tensor:
        """Write `ids` at positions start.. of `slot`; float logits of the last position (V,), or of every
        position (T, V) when `all_logits`."""
        d = self.model.device
        tokens = to_device([ids], torch.long, d)
        pos = torch.arange(start, start + len(ids), device=d)
        view = row_view(self.cache, slot, start, self.bucket(start + len(ids)))
        h = self.model.transformer(tokens, None, None, view, pos, self.prefill_plan)[0]
        if all_logits:
            return self.model.scale_logits(F.linear(h, self.model.unembedding)).float()
        return self._logits(h[-1:])[0]

    def prefill_packed(self, parts: list[tuple[int, list[int]]]) -> Tensor:
        """Write the first chunks of several sequences, each `(slot, ids)` from position 0 of its slot, in one
        forward (smalto/serve/prefill.py); float logits (N, V) of each chunk's last position. Each computes what
        `prefill(slot, ids, 0)` computes."""
        return self.packed(parts)

    def _step(self, tokens: Tensor, pos: Tensor, n_keys: int) -> Tensor:
        """tokens (B,), pos (B,) → float logits (B, V); row b's token is written at position pos[b], and row b
        attends to keys 0..pos[b] of the first `n_keys` (an idle row, at the scratch position: to key 0)."""
        m, c = self.model, self.model.config
        tr = m.transformer
        q_pos = torch.where(pos == self.scratch, 0, pos)
        x = tr.wte(tokens[:, None])
        if c.uses_wpe:
            x = x + tr.wpe(q_pos)[:, None]
        rope = None
        if c.attn_config.rope:
            a = c.attn_config
            cos, sin = rope_cos_sin_rows(q_pos, c.head_dim, a.rope_theta, a.rope_scaling)  # (B, D)
            rope = (cos[:, None, None, :], sin[:, None, None, :])  # broadcast over (B, H, 1, D)
        mask = AttentionMask(q_pos=q_pos, n_keys=n_keys, window=c.attn_config.sliding_window_size)
        bias = (
            slot_bias(q_pos, n_keys, self.slopes, mask.window, x.dtype)
            if self.attention is SLOT_ATTENTION
            else None
        )
        inputs = AttentionInputs(mask=mask, kernel=self.attention, slopes=self.slopes, rope=rope, state=bias)
        cache = StepCache(self.cache, pos, n_keys)
        for block in self.blocks:
            x = block(x, inputs, cache)
        return self._logits(tr.norm_f(x)[:, -1])

    def step(self, tokens: Tensor, pos: Tensor, n_keys: int | None = None) -> Tensor:
        """One decode step over the first `n_keys` positions (a bucket; default: the largest). Compiled, each
        bucket is its own graph, captured at its first step (`Engine.warmup` steps every bucket)."""
        n = self.buckets[-1] if n_keys is None else n_keys
        if n not in self.buckets:
            raise ValueError(f"n_keys {n} is not one of the decode buckets {self.buckets}")
        if not self.compiled:
            return self.step_fn(tokens, pos, n)
        torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.step_fn(tokens, pos, n)
        except Exception as e:  # a compile failure must not cost the requests their answers; it is reported
            warnings.warn(f"compiled decode failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=2)
            self.step_fn, self.compiled = self._step, False
            return self._step(tokens, pos, n)
