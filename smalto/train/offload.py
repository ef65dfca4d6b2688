"""Optimizer state kept in CPU memory and streamed through the GPU for each step (`optimizer.offload: cpu`).

For full finetuning on one GPU, where the optimizer state is what does not fit: AdamW's two float32 moments are
54 GB for MPT-7B. `OffloadedState` wraps one of smalto's optimizers (torch AdamW, AdamW with bf16 moments, LION)
and keeps its state tensors in pinned CPU memory. A step walks the parameters in chunks of CHUNK_ELEMENTS: the
chunk's state is copied to the GPU on a side stream (the next chunk's copy overlaps this chunk's update), the
wrapped optimizer steps that chunk alone, with its own fused / foreach kernels, and the new state is copied back
on another stream. The GPU holds about three chunks of state at a time; the update is the wrapped optimizer's,
bit for bit.

Why not FSDP2's `CPUOffloadPolicy` or torchao's `CPUOffloadOptimizer`: both keep the master weights on the CPU and
run the optimizer step on the CPU, so every step also moves the weights and gradients over PCIe and runs AdamW on
host cores — several seconds a step at 7B parameters. Streaming moves only the state (2 × 54 GB a step for
float32 AdamW, half that with bf16 moments), overlapped with the update, and keeps weights and gradients on the GPU.

One process only: under torchrun FSDP2 already divides the state among the GPUs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

# parameters' elements per chunk: 512 MB of float32 AdamW state on the GPU per chunk in flight
CHUNK_ELEMENTS = 1 << 26


class OffloadedState(torch.optim.Optimizer):
    """`inner`'s update with `inner`'s state in CPU memory (pinned when CUDA is present). The wrapper shares
    `inner`'s `param_groups` and `state`, so schedules, `state_dict` and DCP checkpoints see one optimizer."""

    def __init__(self, inner: torch.optim.Optimizer, chunk_elements: int = CHUNK_ELEMENTS):
        self.inner = inner
        self.chunk_elements = chunk_elements
        # not Optimizer.__init__: the groups, state and defaults are the wrapped optimizer's own objects
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._arena = HostArena(pin=torch.cuda.is_available())

    def __repr__(self) -> str:
        return f"OffloadedState({self.inner!r})"

    def chunks(self) -> list[list[Tensor]]:
        """The parameters with gradients, in order, grouped into runs of at most chunk_elements (a larger
        parameter is a chunk alone)."""
        out: list[list[Tensor]] = [[]]
        size = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if out[-1] and size + p.numel() > self.chunk_elements:
                    out.append([])
                    size = 0
                out[-1].append(p)
                size += p.numel()
        return [c for c in out if c]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        chunks = self.chunks()
        if not chunks:
            return loss
        device = chunks[0][0].device
        cuda = device.type == "cuda"
        # the update runs on the current stream; copies to and from the GPU on their own streams
        compute: Any = torch.cuda.current_stream(device) if cuda else None
        h2d: Any = torch.cuda.Stream(device) if cuda else None
        d2h: Any = torch.cuda.Stream(device) if cuda else None

        def fetch(chunk: list[Tensor]) -> tuple[dict[Tensor, dict[str, Any]], Any]:
            """The chunk's state on `device` (copies issued on the h2d stream) and the event that ends them."""
            with torch.cuda.stream(h2d) if cuda else _nothing():
                on_dev = {
                    p: {k: _to(v, device) for k, v in self.state[p].items()} for p in chunk if self.state[p]
                }
                done = torch.cuda.Event() if cuda else None
                if done is not None:
                    done.record()
            return on_dev, done

        ahead = fetch(chunks[0])
        stored: list[Any] = []  # per chunk, the event that ends its copy back to CPU memory
        for i, chunk in enumerate(chunks):
            on_dev, ready = ahead
            if cuda:
                compute.wait_event(ready)
                for st in on_dev.values():
                    for v in st.values():
                        if isinstance(v, Tensor) and v.is_cuda:
                            v.record_stream(compute)  # made on h2d, used and freed on compute
            if i + 1 < len(chunks):
                if cuda and i >= 1:
                    # the host waits for chunk i-1's state to be back in CPU memory before the GPU memory of chunk
                    # i+1 is taken: at most three chunks' state on the GPU, in the first step (which creates the
                    # state) as in every other; the GPU still has chunk i's update queued meanwhile
                    stored[i - 1].synchronize()
                ahead = fetch(chunks[i + 1])  # overlaps this chunk's update
            # the CPU copies (empty before the first step); copied dicts, since the wrapped optimizer fills a
            # parameter's state dict in place when it creates the state
            held = {p: dict(self.state[p]) for p in chunk}
            for p, st in on_dev.items():
                self.state[p] = st
            self._step_only(chunk)
            if cuda:
                stepped = torch.cuda.Event()
                stepped.record(compute)
                d2h.wait_event(stepped)
            with torch.cuda.stream(d2h) if cuda else _nothing():
                for p in chunk:
                    self.state[p] = self._store(self.state[p], held[p], d2h)
                if cuda:
                    back = torch.cuda.Event()
                    back.record(d2h)
                    stored.append(back)
        if cuda:
            d2h.synchronize()  # the CPU copies are whole before anyone (a checkpoint) reads them
        return loss

    def _step_only(self, chunk: list[Tensor]) -> None:
        """The wrapped optimizer's step over `chunk`'s parameters alone."""
        ids = {id(p) for p in chunk}
        everything = [g["params"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["params"] = [p for p in g["params"] if id(p) in ids]
            self.inner.step()
        finally:
            for g, params in zip(self.param_groups, everything, strict=True):
                g["params"] = params

    def _store(self, st: dict[str, Any], held: dict[str, Any], stream: Any) -> dict[str, Any]:
        """`st`'s tensors written into their CPU copies in `held` (made, pinned, at the first step); scalars (step
        counts) stay where the wrapped optimizer keeps them."""
        out: dict[str, Any] = {}
        for k, v in st.items():
            if not isinstance(v, Tensor) or v.dim() == 0:
                out[k] = v
                continue
            cpu = held.get(k)
            if cpu is None or cpu.device.type != "cpu" or cpu.shape != v.shape or cpu.dtype != v.dtype:
                cpu = self._arena.empty(v.shape, v.dtype)
            if v.is_cuda and stream is not None:
                v.record_stream(stream)
            cpu.copy_(v, non_blocking=v.is_cuda)
            out[k] = cpu
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The wrapped optimizer's (which moves the state to each parameter's device), then the state back to CPU
        memory."""
        self.inner.load_state_dict(state_dict)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        for p, st in self.state.items():
            self.state[p] = {k: _to_cpu(v, self._arena) for k, v in st.items()}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _to(v: Any, device: torch.device) -> Any:
    """A state value on `device`: tensors copied (a new tensor even on the CPU, so the stored copy is written only
    by `_store`); scalars (step counts) stay where they are."""
    if not isinstance(v, Tensor) or v.dim() == 0:
        return v
    return v.to(device, non_blocking=v.is_pinned(), copy=True)


def _to_cpu(v: Any, arena: HostArena) -> Any:
    if not isinstance(v, Tensor) or v.dim() == 0 or v.device.type == "cpu":
        return v
    out = arena.empty(v.shape, v.dtype)
    out.copy_(v)
    return out


class HostArena:
    """CPU tensors carved out of SLAB_BYTES slabs (pinned when `pin`). torch's pinned-memory allocator rounds each
    allocation up to a power of two: pinning MPT-7B's AdamW state tensor by tensor would take ~1.6× its 54 GB
    (a 268 MB up_proj moment gets 512 MB). Slabs are a power of two, so nothing is rounded; what is lost is a slab's
    tail that the next tensor does not fit. A tensor larger than a slab gets a slab of its own."""

    SLAB_BYTES = 1 << 30
    ALIGN = 512

    def __init__(self, pin: bool):
        self.pin = pin
        self.slab: Tensor | None = None
        self.used = 0

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        n = math.prod(shape) * dtype.itemsize
        if n > self.SLAB_BYTES:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        if self.slab is None or self.used + n > self.SLAB_BYTES:
            self.slab, self.used = torch.empty(self.SLAB_BYTES, dtype=torch.uint8, pin_memory=self.pin), 0
        out = self.slab[self.used : self.used + n].view(dtype).view(shape)
        self.used += -(-n // self.ALIGN) * self.ALIGN
        return out
