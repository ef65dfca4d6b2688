"""65,536-token rows (the storywriter recipe's data): the writer holds a shard's samples once (it streams the shard to
its file, hashing and compressing on the way), a compressed shard is fetched and decompressed into the cache a chunk
at a time, and the loader gives (1, 65536) batches equal to the rows written."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from smalto.data.dataset import MDSDataset
from smalto.data.mds import MDSWriter
from smalto.data.stream import DataConfig, SourceConfig, build_loader

SEQ = 65536
SHARD = 16 << 20  # bytes: 63 rows of int32 tokens


def _rows(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 50432, SEQ, dtype=np.int32) for _ in range(n)]


def _peak(fn) -> int:
    """Bytes allocated by `fn` at its peak, above what was allocated before it (numpy arrays included)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_the_writer_holds_a_shard_once(tmp_path, compression):
    rows = _rows(70)  # one full shard and part of a second
    row_bytes = rows[0].nbytes

    def write() -> None:
        w = MDSWriter(tmp_path / "ds", compression=compression, size_limit=SHARD)
        for r in rows:
            w.write(r)
        w.finish()

    peak = _peak(write)
    # the samples of one shard (up to SHARD bytes) and a row being encoded: not a second copy of the shard
    assert peak < SHARD + 4 * row_bytes, f"{peak / 2**20:.1f} MiB for {SHARD / 2**20:.0f} MiB shards"
    ds = MDSDataset(str(tmp_path / "ds"), cache_dir=tmp_path / "cache")
    assert len(ds) == 70 and len(ds.entries) == 2
    assert all(np.array_equal(ds.tokens(i), rows[i]) for i in (0, 62, 63, 69))


def test_a_compressed_shard_is_decompressed_a_chunk_at_a_time(tmp_path):
    rows = _rows(63)
    w = MDSWriter(tmp_path / "ds", compression="zstd", size_limit=SHARD)
    for r in rows:
        w.write(r)
    (entry,) = w.finish()
    ds = MDSDataset(str(tmp_path / "ds"), cache_dir=tmp_path / "cache")
    got: list[np.ndarray] = []
    peak = _peak(lambda: got.append(ds.tokens(5).copy()))  # fetch, verify, decompress into the cache, read
    assert peak < entry["raw_data"]["bytes"] // 4, (
        f"{peak / 2**20:.1f} MiB to open a {SHARD / 2**20:.0f} MiB shard"
    )
    assert np.array_equal(got[0], rows[5])
    (cached,) = (tmp_path / "cache").rglob("shard.00000.mds")
    assert cached.stat().st_size == entry["raw_data"]["bytes"]


def test_the_loader_gives_rows_of_65536_tokens(tmp_path):
    rows = _rows(6)
    for r in rows:
        r[1000] = 0  # an EOS inside: a second document in the row
    w = MDSWriter(tmp_path / "ds" / "train", compression="zstd", size_limit=1 << 20)  # a row per shard
    for r in rows:
        w.write(r)
    w.finish()
    cfg = DataConfig(
        sources=[SourceConfig(path=str(tmp_path / "ds"))],
        seq_len=SEQ,
        shuffle=False,
        eos_id=0,
        cache_dir=str(tmp_path / "cache"),
        cache_limit=3 << 20,  # three decompressed shards at most
    )
    loader = build_loader(cfg, micro_batch_size=1, global_batch_size=2)
    it = iter(loader)
    for i in range(6):
        b = next(it)
        assert b["input_ids"].shape == b["labels"].shape == b["sequence_id"].shape == (1, SEQ)
        assert np.array_equal(b["input_ids"][0].numpy(), rows[i])
        assert b["sequence_id"][0, 1000] == 0 and b["sequence_id"][0, 1001] == 1
    cached = list((tmp_path / "cache").rglob("shard.*"))
    assert 0 < sum(p.stat().st_size for p in cached) <= 3 << 20  # least recently used shards evicted
    assert not [p for p in cached if ".tmp-" in p.name]  # no temporary file left behind
