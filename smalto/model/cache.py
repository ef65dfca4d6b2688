"""A static, preallocated KV cache for decoding.

All S slots exist from the start; a forward writes its keys/values at the queries' positions and attends over all S
slots, the causal mask hiding the slots not written yet. Shapes never change between decode steps, so the step can
be compiled once and captured in a CUDA graph (gpt-fast's design).
"""

from __future__ import annotations

import torch
from torch import Tensor

from smalto.errors import UserError


class KVCache:
    """Keys and values of every layer: (n_layers, B, K, S, D) each, plus which slots hold real (non-pad) tokens."""

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
        shape = (n_layers, batch_size, kv_n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
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
        return self.k.shape[1]

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
        self.k[layer].index_copy_(2, pos, k_new.to(self.k.dtype))
        self.v[layer].index_copy_(2, pos, v_new.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def reset(self) -> None:
        self.length = 0
        self.valid.fill_(True)
