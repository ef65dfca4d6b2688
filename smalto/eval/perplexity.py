"""Perplexity on a token-shard validation set (MDS shards written by `smalto data`, or llm-foundry's).

Every sample's next-token cross-entropy over all its tokens (a sample longer than the model's max_seq_len is
cut into windows of that length); perplexity = exp(total CE / total predicted tokens). Token-weighted, so the
number equals the training loss on the same tokens. Samples are split across ranks and the sums all-reduced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from smalto.errors import DataError
from smalto.eval.scorer import is_smalto, model_max_len

_INDEX = "index.json"


def find_split(data: str | Path) -> str:
    """A folder holding index.json, or a `smalto data` output folder (its val/ split, else train/)."""
    p = Path(data)
    for cand in (p, p / "val", p / "train"):
        if (cand / _INDEX).is_file():
            return str(cand)
    raise DataError(
        f"--perplexity {p}: no {_INDEX} there nor in {p}/val or {p}/train; point it at token shards from `smalto data`"
    )


@torch.no_grad()
def perplexity(
    model: Any,
    data: str | Path,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """{"loss": mean next-token CE (nats), "perplexity", "tokens", "samples", "seconds", "data"}.
    `on_batch(rows done, rows)` after each batch of this rank's rows."""
    from smalto.data.dataset import MDSDataset

    split = find_split(data)
    ds = MDSDataset(split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise DataError(f"{split} holds no samples")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _dist() else (0, 1)
    device = next(model.parameters()).device
    window = model_max_len(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    rows: list[torch.Tensor] = []
    for i in range(rank, n, world):
        toks = torch.as_tensor(ds.tokens(i).astype("int64"))
        rows.extend(
            toks[s : s + window] for s in range(0, len(toks), window) if len(toks[s : s + window]) > 1
        )
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of CE, predicted tokens)
    try:
        for b in range(0, len(rows), batch_size):
            total += _batch_ce(model, rows[b : b + batch_size], device)
            if on_batch is not None:
                on_batch(min(b + batch_size, len(rows)), len(rows))
    finally:
        model.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(total)
    loss = float(total[0] / total[1])
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": int(total[1]),
        "samples": n,
        "seconds": time.perf_counter() - t0,
        "data": split,
    }


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _batch_ce(model: Any, rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    ids, mask = ids.to(device), mask.to(device)
    if is_smalto(model):
        h = model.transformer(ids, None if bool(mask.all()) else mask)
        logits = model.unembed(h[:, :-1])
    else:
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    ce = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return torch.stack([ce.double(), mask[:, 1:].sum().double()])
