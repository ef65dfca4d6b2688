"""The global order of samples in an epoch: which source, which sample, at every position.

It is a pure function of (seed, epoch, source sizes, mixing counts), so every rank and every dataloader
worker computes the same order on its own and takes its positions from it; nothing is communicated,
and resuming only needs the position reached.

Mixing (as Streaming does it): each source contributes `count` samples per epoch. With `proportion`, the
counts split `epoch_size` (default: the sum of all source sizes) by the proportions; with `repeat`, a
source contributes `repeat × size`; with `choose`, exactly that many; with none, its size. A count above
the size repeats every sample ⌊count/size⌋ times plus a random subset for the rest; below, a random subset.

Shuffling keeps some locality so lazily downloaded shards are reused: within each source the shard order
is permuted, the sources are interleaved at random (so the mix holds at every scale), and then samples are
permuted within blocks of `block` positions (so each block touches few shards).
"""

from __future__ import annotations

import numpy as np


def epoch_counts(
    sizes: list[int],
    *,
    proportions: list[float | None],
    repeats: list[float | None],
    chooses: list[int | None],
    epoch_size: int | None,
) -> list[int]:
    """Samples each source contributes to one epoch (the caller has checked the settings are consistent)."""
    if any(p is not None for p in proportions):
        total = epoch_size if epoch_size is not None else sum(sizes)
        weights = np.array(proportions, np.float64)
        exact = total * weights / weights.sum()
        counts = np.floor(exact).astype(np.int64)
        # Hand out the rounding remainder to the largest fractional parts, so the counts sum to `total`.
        short = total - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        return [int(c) for c in counts]
    out = []
    for size, rep, cho in zip(sizes, repeats, chooses, strict=True):
        out.append(int(cho) if cho is not None else round(size * rep) if rep is not None else size)
    return out


def _chosen(size: int, count: int, rng: np.random.Generator | None) -> np.ndarray:
    reps, rest = divmod(count, size)
    whole = np.tile(np.arange(size, dtype=np.int64), reps)
    part = np.arange(rest, dtype=np.int64) if rng is None else np.sort(rng.choice(size, rest, replace=False))
    return np.concatenate([whole, part])


def epoch_order(
    shard_ends: list[np.ndarray],
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    block: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample) for every position of the epoch, as two arrays of length sum(counts)."""
    per_source = []
    for s, (ends, count) in enumerate(zip(shard_ends, counts, strict=True)):
        size = int(ends[-1])
        rng = np.random.default_rng([seed, epoch, s]) if shuffle else None
        ids = _chosen(size, count, rng)
        if rng is not None and len(ends) > 1:
            shard_of = np.searchsorted(ends, ids, side="right")
            shard_rank = rng.permutation(len(ends))[shard_of]
            ids = ids[np.lexsort((rng.random(len(ids)), shard_rank))]
        per_source.append(ids)
    src = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    if not shuffle:
        return src, np.concatenate(per_source) if per_source else np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, epoch, 1 << 20])
    src = rng.permutation(src)
    idx = np.empty(len(src), np.int64)
    for s, ids in enumerate(per_source):
        idx[src == s] = ids  # each source keeps its shard-local order within the interleaving
    keys = np.arange(len(src)) // max(block, 1)
    perm = np.lexsort((rng.random(len(src)), keys))
    return src[perm], idx[perm]
