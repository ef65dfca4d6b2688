"""A static, preallocated KV cache for decoding.

All S slots exist from the start; a forward writes its keys/values at the queries' positions and attends over all S
slots, the causal mask hiding the slots not written yet. Shapes never change between decode steps, so the step can
be compiled once and captured in a CUDA graph (gpt-fast's design).

Each layer has its own k and v tensors (not views of one big buffer): under torch.compile a write into a view
of a larger graph input is functionalised into a copy of the whole base, which for one (n_layers, ...) buffer
meant copying every layer's cache at every layer of every decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smalto.errors import UserError


class KVCache:
    """Keys and values of every layer: `keys[i]`, `values[i]` of shape (B, K, S, D), plus which slots hold real
    (non-pad) tokens: `valid` (B, S)."""

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        kv_n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, kv_n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0  # slots filled so far (host-side bookkeeping for eager callers)

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        return cls(
            n_layers=config.n_layers,
            batch_size=batch_size,
            kv_n_heads=config.kv_n_heads,
            max_len=max_len,
            head_dim=config.head_dim,
            dtype=dtype,
            device=device,
        )

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def tensors(self) -> list[Tensor]:
        """Every buffer (for torch._dynamo.mark_static_address)."""
        return [*self.keys, *self.values, self.valid]

    def select_rows(self, idx: Tensor) -> KVCache:
        """A new cache whose row i is a copy of row idx[i] of this one (same length and capacity)."""
        new = object.__new__(KVCache)
        new.keys = [k.index_select(0, idx) for k in self.keys]
        new.values = [v.index_select(0, idx) for v in self.values]
        new.valid = self.valid.index_select(0, idx)
        new.max_len, new.length = self.max_len, self.length
        return new

    def view(self, n_keys: int, length: int, rows: slice = slice(None)) -> KVCache:
        """A cache over the first `n_keys` positions of `rows` (views, no copies: a forward on it writes into this
        cache) with `length` positions filled. A chunk of a prompt attends to the positions written so far only."""
        view = object.__new__(KVCache)
        view.keys = [k[rows, :, :n_keys] for k in self.keys]
        view.values = [v[rows, :, :n_keys] for v in self.values]
        view.valid = self.valid[rows, :n_keys]
        view.max_len, view.length = n_keys, length
        return view

    def get_seq_length(self) -> int:
        return self.length

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise UserError(
                f"the KV cache holds {self.max_len} tokens and {self.length} are used; {n_new} more do not fit "
                "(raise max_new_tokens' room: a larger cache / max_seq_len)"
            )

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, K, T, D) at positions `pos` (T,) and return the whole layer (B, K, S, D)."""
        k, v = self.keys[layer], self.values[layer]
        k.index_copy_(2, pos, k_new.to(k.dtype))
        v.index_copy_(2, pos, v_new.to(v.dtype))
        return k, v

    def reset(self) -> None:
        self.length = 0
        self.valid.fill_(True)
