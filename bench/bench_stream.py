"""Streaming loader throughput: tokens/s per process from local uncompressed shards.

    python bench/bench_stream.py [--tokens 50_000_000] [--seq-len 2048] [--micro-batch 8] [--workers 0]

Writes synthetic shards (random int32 tokens with an EOS every ~500 tokens) to a temporary folder, then
times the full loader path: shuffled global order, shard reads, int64 batches, labels and sequence_id.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from smalto.data.mds import MDSWriter
from smalto.data.stream import DataConfig, build_loader


def write_shards(root: Path, tokens: int, seq_len: int) -> int:
    rng = np.random.default_rng(0)
    w = MDSWriter(root / "train", dtype="int32")
    n = tokens // seq_len
    for _ in range(n):
        sample = rng.integers(1, 50000, size=seq_len, dtype=np.int32)
        sample[rng.random(seq_len) < 1 / 500] = 0
        w.write(sample)
    w.finish()
    return n


def measure(
    root: Path, *, seq_len: int, micro: int, workers: int, seconds: float
) -> tuple[float, float, int]:
    cfg = DataConfig.from_dict(
        {"sources": [{"path": str(root)}], "seq_len": seq_len, "num_workers": workers, "eos_id": 0}
    )
    loader = build_loader(cfg, micro_batch_size=micro, global_batch_size=micro)
    it = iter(loader)
    next(it)  # start-up (workers, the epoch order, first shard maps) is not throughput
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = next(it)
        batches += 1
    elapsed = time.perf_counter() - start
    assert b["input_ids"].shape == (micro, seq_len)
    return batches * micro * seq_len / elapsed, batches / elapsed, batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=50_000_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        n = write_shards(root, args.tokens, args.seq_len)
        Console().print(f"wrote {n:,} samples × {args.seq_len} tokens in {time.perf_counter() - t:.1f}s")
        table = Table(
            title=f"smalto.data.stream on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"
        )
        for col in ("seq_len", "micro-batch", "workers", "batches", "batches/s", "tokens/s"):
            table.add_column(col, justify="right")
        for workers in args.workers:
            tps, bps, batches = measure(
                root, seq_len=args.seq_len, micro=args.micro_batch, workers=workers, seconds=args.seconds
            )
            table.add_row(
                str(args.seq_len),
                str(args.micro_batch),
                str(workers),
                f"{batches:,}",
                f"{bps:,.0f}",
                f"{tps / 1e6:,.2f} M",
            )
        Console().print(table)


if __name__ == "__main__":
    main()
