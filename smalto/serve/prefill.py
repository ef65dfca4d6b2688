"""The packed prefill: the first chunks of several sequences in one forward, laid end to end with attention kept
inside each (as a packed training batch), each written into its own slot of the server's cache.

    packed = PackedPrefill(model, cache, plan, logits, scratch=..., max_rows=64, max_tokens=2048)
    packed.capture()                  # on CUDA: one CUDA graph per token bucket, before the first request
    logits = packed([(slot, ids), ...])   # (N, V) float: each chunk's last position

Why graphs: an eager forward of the MPT-7B shape is ≈ 650 kernels from ≈ 4,300 operator calls, tens of
milliseconds of host time where the device needs a few for a few hundred tokens, and every running sequence waits
for the step that prefills. So on CUDA the forward runs at a few token counts (`token_buckets`: multiples of 16
about 1.5× apart, so padding wastes at most a third), each captured once as a CUDA graph; a prefill is one host-to-
device copy of its inputs and one replay. The padding is tokens of a segment of their own, at position 0, whose keys
go to the scratch position of slot 0 (past every sequence's positions: nothing reads it). The graphs share one
memory pool (they never run at once), and a total above the largest bucket runs eagerly.

Each chunk's RoPE angles, learned positions and ALiBi distances are its own from position 0, so the packed forward
computes what a forward of each chunk alone computes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from smalto.model.attention import AttentionMask, AttentionPlan, build_attention_inputs
from smalto.model.cache import KVCache
from smalto.model.mpt import MPTForCausalLM
from smalto.model.rope import rope_cos_sin_rows

SMALLEST = 64  # the smallest token bucket
GRAPH_MAX_TOKENS = 4096  # larger packs run eagerly: their device time dwarfs the host's
FIELDS = 6  # per token: id, segment, position, slot, cache position, its chunk's last position


def token_buckets(max_tokens: int, smallest: int = SMALLEST) -> list[int]:
    """Token counts the forward is captured at: multiples of 16 from `smallest`, each ≈ 1.5× the last, up to
    `max_tokens` (rounded up to 16; at most GRAPH_MAX_TOKENS)."""
    top = min(-(-max_tokens // 16) * 16, GRAPH_MAX_TOKENS)
    out, b = [], smallest
    while b < top:
        out.append(b)
        b = -(-(b * 3 // 2) // 16) * 16
    return [*out, top]


class PackedPrefill:
    """`__call__(parts)` writes each `(slot, ids)` from position 0 of its slot and returns (N, V) float logits of
    each chunk's last position; `logits(h)` maps hidden states (N, d) to them. `scratch`: the position that
    padding writes to. `max_rows`: the most chunks one call packs (the slots)."""

    def __init__(
        self,
        model: MPTForCausalLM,
        cache: KVCache,
        plan: AttentionPlan,
        logits: Callable[[Tensor], Tensor],
        *,
        scratch: int,
        max_rows: int,
        max_tokens: int,
    ):
        self.model, self.cache, self.plan, self.logits = model, cache, plan, logits
        self.scratch, self.max_rows = scratch, max_rows
        self.buckets = token_buckets(max_tokens)
        self.cuda = cache.device.type == "cuda"
        # T → (graph, its static inputs, its static logits)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        # captured graphs run when there are any (bench/serve_engine.py can turn them off)
        self.use_graphs = True

    def __call__(self, parts: list[tuple[int, list[int]]]) -> Tensor:
        total = sum(len(ids) for _, ids in parts)
        T = next((b for b in self.buckets if b >= total), None) if self.graphs and self.use_graphs else None
        if T is None:  # eager, at its own size
            inputs = self._inputs(parts, total, len(parts)).to(self.cache.device, non_blocking=self.cuda)
            return self.forward(inputs, total, len(parts))
        graph, inputs, out = self.graphs[T]
        inputs.copy_(self._inputs(parts, T, self.max_rows), non_blocking=True)
        graph.replay()
        # a copy: the next replay (of any bucket: one memory pool) may reuse the memory around `out`
        return out[: len(parts)].clone()

    def _inputs(self, parts: list[tuple[int, list[int]]], T: int, R: int) -> Tensor:
        """The forward's integer inputs for `parts` padded to T tokens and R rows, in one (FIELDS·T + R,) tensor
        on the host (pinned on CUDA: its copy to the device does not wait for the step in flight)."""
        lens = [len(ids) for _, ids in parts]
        pad = T - sum(lens)
        ids = [t for _, chunk in parts for t in chunk] + [0] * pad
        seg = [i for i, n in enumerate(lens) for _ in range(n)] + [len(parts)] * pad
        pos = [p for n in lens for p in range(n)] + [0] * pad
        slots = [slot for slot, chunk in parts for _ in chunk] + [0] * pad
        where = pos[: T - pad] + [self.scratch] * pad  # padding's keys go to slot 0's scratch position
        longest = [n - 1 for n in lens for _ in range(n)] + [0] * pad
        last, end = [], 0
        for n in lens:
            end += n
            last.append(end - 1)
        last += [0] * (R - len(parts))
        flat = ids + seg + pos + slots + where + longest + last
        return torch.tensor(flat, dtype=torch.long, pin_memory=self.cuda)

    def forward(self, inputs: Tensor, T: int, R: int) -> Tensor:
        """The packed forward on `inputs` (from `_inputs`, T tokens, R rows): writes the cache, returns (R, V)."""
        m, c = self.model, self.model.config
        tokens, seg, pos, slots, where, longest = inputs[: FIELDS * T].view(FIELDS, T)
        last = inputs[FIELDS * T : FIELDS * T + R]
        x = m.transformer.wte(tokens[None])
        if c.uses_wpe:
            x = x + m.transformer.wpe(pos)[None]
        w = c.attn_config.sliding_window_size
        # causality and ALiBi distances by index in the packed row: within one chunk they are its positions
        mask = AttentionMask(
            q_pos=torch.arange(T, device=tokens.device),
            n_keys=T,
            seq_q=seg[None],
            seq_k=seg[None],
            window=w if 0 < w < T else -1,
            from_zero=True,
        )
        attn = build_attention_inputs(c, mask, self.plan, x.dtype)
        if attn.rope is not None:  # RoPE angles from each chunk's own positions (what its keys are cached at)
            a = c.attn_config
            attn.rope = rope_cos_sin_rows(pos, c.head_dim, a.rope_theta, a.rope_scaling, longest)
        cache = PackedWrite(self.cache, slots, where)
        for block in m.transformer.blocks:
            x = block(x, attn, cache)
        return self.logits(m.transformer.norm_f(x)[0, last])

    def capture(self) -> None:
        """Capture the forward at every bucket, largest first, in one memory pool (CUDA only; a failed capture
        is reported and leaves the eager forward)."""
        if not self.cuda or self.graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        try:
            for T in reversed(self.buckets):
                # padding only: writes nothing any slot reads
                inputs = self._inputs([], T, self.max_rows).to(self.cache.device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up forwards: kernels tuned and loaded before capture
                    for _ in range(2):
                        self.forward(inputs, T, self.max_rows)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: what another thread does meanwhile (the server's event loop) cannot break it
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    out = self.forward(inputs, T, self.max_rows)
                self.graphs[T] = (graph, inputs, out)
        except Exception as e:  # serving goes on, eagerly, and says so
            self.graphs.clear()
            warnings.warn(
                f"capturing the prefill failed ({type(e).__name__}: {e}); prefilling eagerly", stacklevel=2
            )


class PackedWrite:
    """The cache as a packed prefill sees it: token t is written at position `pos[t]` of slot `slots[t]`, and
    attention gets the chunk's own keys and values (every chunk starts at position 0: nothing before it)."""

    def __init__(self, cache: KVCache, slots: Tensor, pos: Tensor):
        self.cache, self.slots, self.pos = cache, slots, pos

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, q_pos: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.cache.keys[layer], self.cache.values[layer]
        k[self.slots, :, self.pos] = k_new[0].transpose(0, 1).to(k.dtype)  # (T, K, D) at (slot[t], :, pos[t])
        v[self.slots, :, self.pos] = v_new[0].transpose(0, 1).to(v.dtype)
        return k_new, v_new
