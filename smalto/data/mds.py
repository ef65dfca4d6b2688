"""Streaming's MDS shard format, read and written without the `mosaicml-streaming` package.

A dataset folder (one split) holds `index.json` and `shard.NNNNN.mds` files (`.mds.zstd` when compressed).

index.json:  {"version": 2, "shards": [shard, ...]}, where each shard entry is the shard's config
             (version, format="mds", compression, hashes, size_limit, column_names, column_encodings,
             column_sizes) plus samples, raw_data {basename, bytes, hashes} and zip_data (same, or null).
shard file:  uint32 n | uint32 offsets[n + 1] | config JSON | sample bytes...
             offsets are absolute file positions: sample i is file[offsets[i]:offsets[i + 1]].
sample:      uint32 size of every variable-size column (column_sizes[c] is null), in column order,
             then each column's bytes in column order. Columns are sorted by name.
ndarray:D    (dtype fixed, shape dynamic) = uint8 (ndim << 2 | shape-dtype code) | shape | values,
             shape-dtype code 0..3 = uint8/16/32/64.

Everything is little-endian. Only the `tokens` column matters to smalto; other columns are skipped.
Old llm-foundry datasets store `tokens` with the `bytes` encoding (raw int64 values); those read too.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smalto.errors import DataError

INDEX = "index.json"
_SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")
_TOKEN_DTYPES = ("int32", "uint16", "uint32", "int64", "uint8", "int16")


# ---- compression and hashing (the names Streaming uses: "zstd" or "zstd:LEVEL", hashlib names, xxh*) ----


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise DataError(
            "zstd compression needs the `zstandard` package: pip install 'smalto[data]' (or zstandard)"
        ) from None
    return zstandard


def check_compression(compression: str | None) -> None:
    """Refuse anything but None / "zstd" / "zstd:LEVEL" before any work is done."""
    if compression is None:
        return
    name, _, level = compression.partition(":")
    if name != "zstd" or (level and not (level.isdigit() and 1 <= int(level) <= 22)):
        raise DataError(f"compression {compression!r} is not supported: use 'zstd' or 'zstd:LEVEL' (1-22)")
    _zstd()


def compress(compression: str, data: bytes) -> bytes:
    _, _, level = compression.partition(":")
    return bytes(_zstd().ZstdCompressor(level=int(level or 3)).compress(data))


def decompress(compression: str, data: bytes) -> bytes:
    if not compression.startswith("zstd"):
        raise DataError(f"shard compression {compression!r} is not supported (only zstd)")
    return bytes(_zstd().ZstdDecompressor().decompressobj().decompress(data))


def file_hash(algo: str, data: bytes) -> str | None:
    """Hex digest with Streaming's algorithm names; None when the algorithm is unavailable here."""
    if algo.startswith("xxh"):
        try:
            import xxhash
        except ImportError:
            return None
        fn = getattr(xxhash, f"{algo}_hexdigest", None)
        return fn(data) if fn else None
    if algo in hashlib.algorithms_available:
        return hashlib.new(algo, data).hexdigest()
    return None


def verify_hashes(data: bytes, expected: dict[str, str], where: str) -> None:
    """Check every digest we can compute; the index may list algorithms we lack (xxh without xxhash)."""
    for algo, want in expected.items():
        got = file_hash(algo, data)
        if got is not None and got != want:
            raise DataError(
                f"{where}: {algo} hash mismatch (index says {want}, file has {got}); delete the file or re-download"
            )


# ---- writing ----


class MDSWriter:
    """Writes one split folder: shards of at most `size_limit` bytes holding a single `tokens` column."""

    def __init__(
        self,
        out: Path,
        *,
        dtype: str = "int32",
        compression: str | None = None,
        size_limit: int = 1 << 26,
        hashes: tuple[str, ...] = ("sha1",),
    ) -> None:
        if dtype not in _TOKEN_DTYPES:
            raise DataError(f"token dtype {dtype!r} is not supported: use one of {', '.join(_TOKEN_DTYPES)}")
        check_compression(compression)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.compression = compression
        self.size_limit = size_limit
        self.hashes = sorted(hashes)
        self.config = {
            "version": 2,
            "format": "mds",
            "compression": compression,
            "hashes": self.hashes,
            "size_limit": size_limit,
            "column_names": ["tokens"],
            "column_encodings": [f"ndarray:{dtype}"],
            "column_sizes": [None],
        }
        self._config_bytes = json.dumps(self.config, sort_keys=True).encode()
        self.shards: list[dict[str, Any]] = []
        self._samples: list[bytes] = []
        # Size accounting as Streaming does it, so shard boundaries match what its writer would produce.
        self._shard_bytes = 8 + len(self._config_bytes)

    def write(self, tokens: np.ndarray) -> None:
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("a sample must be a non-empty 1-D array of token ids")
        values = tokens.astype(self.dtype, copy=False).tobytes()
        n = len(tokens)
        code = 0 if n < 1 << 8 else 1 if n < 1 << 16 else 2 if n < 1 << 32 else 3
        body = bytes([(1 << 2) | code]) + np.array([n], _SHAPE_DTYPES[code]).tobytes() + values
        sample = np.array([len(body)], np.uint32).tobytes() + body
        if self._samples and self.size_limit < self._shard_bytes + len(sample) + 4:
            self._flush()
        self._samples.append(sample)
        self._shard_bytes += len(sample) + 4

    def _flush(self) -> None:
        n = len(self._samples)
        sizes = np.array([0] + [len(s) for s in self._samples], np.int64)
        offsets = sizes.cumsum() + 4 + 4 * (n + 1) + len(self._config_bytes)
        raw = (
            np.uint32(n).tobytes()
            + offsets.astype(np.uint32).tobytes()
            + self._config_bytes
            + b"".join(self._samples)
        )
        raw_name = f"shard.{len(self.shards):05d}.mds"
        raw_info = self._info(raw_name, raw)
        zip_info = None
        data = raw
        if self.compression:
            data = compress(self.compression, raw)
            zip_info = self._info(raw_name + ".zstd", data)
        (self.out / (zip_info or raw_info)["basename"]).write_bytes(data)
        self.shards.append({**self.config, "samples": n, "raw_data": raw_info, "zip_data": zip_info})
        self._samples = []
        self._shard_bytes = 8 + len(self._config_bytes)

    def _info(self, basename: str, data: bytes) -> dict[str, Any]:
        return {
            "basename": basename,
            "bytes": len(data),
            "hashes": {a: file_hash(a, data) for a in self.hashes},
        }

    def finish(self) -> list[dict[str, Any]]:
        if self._samples:
            self._flush()
        index = json.dumps({"version": 2, "shards": self.shards}, sort_keys=True)
        (self.out / INDEX).write_text(index)
        return self.shards


# ---- reading ----


def parse_index(text: str, where: str) -> list[dict[str, Any]]:
    """The shard entries of an index.json, checked enough that later errors cannot be cryptic."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("version") != 2 or not isinstance(obj.get("shards"), list):
        raise DataError(f"{where}: not a Streaming index (expected version 2 with a 'shards' list)")
    for i, shard in enumerate(obj["shards"]):
        if not isinstance(shard, dict):
            raise DataError(f"{where}: shard {i} is {shard!r}, not a mapping (a shard's config)")
        if shard.get("format") != "mds":
            raise DataError(
                f"{where}: shard {i} has format {shard.get('format')!r}; only 'mds' shards are supported"
            )
        if "tokens" not in shard.get("column_names", []):
            raise DataError(
                f"{where}: shard {i} has no 'tokens' column (columns: {shard.get('column_names')})"
            )
    return list(obj["shards"])


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Where the tokens column sits inside a sample, computed once per shard from its column spec."""

    column: int  # position of `tokens` among the columns
    n_variable: int  # number of uint32 size words at the start of each sample
    encoding: str
    dtype: np.dtype
    fixed_before: int  # bytes of fixed-size columns before `tokens`
    variable_before: tuple[int, ...]  # indices (into the size words) of variable columns before `tokens`
    size: int | None  # fixed size of `tokens`, if any

    @classmethod
    def of(cls, shard: dict[str, Any]) -> TokenLayout:
        names, encs, sizes = shard["column_names"], shard["column_encodings"], shard["column_sizes"]
        col = names.index("tokens")
        enc = encs[col]
        kind, _, dtype = enc.partition(":")
        if kind == "bytes":
            np_dtype = np.dtype("int64")  # old llm-foundry wrote np.int64 arrays with .tobytes()
        elif kind == "ndarray" and dtype.split(":")[0] in _TOKEN_DTYPES:
            np_dtype = np.dtype(dtype.split(":")[0])
        else:
            raise DataError(
                f"column 'tokens' has encoding {enc!r}; smalto reads ndarray:<int dtype> or bytes"
            )
        var_idx = [i for i, s in enumerate(sizes) if s is None]
        return cls(
            column=col,
            n_variable=len(var_idx),
            encoding=enc,
            dtype=np_dtype,
            fixed_before=sum(s for s in sizes[:col] if s is not None),
            variable_before=tuple(var_idx.index(i) for i in range(col) if sizes[i] is None),
            size=sizes[col],
        )

    def decode(self, buf: memoryview | bytes) -> np.ndarray:
        """The token ids of one sample (a view into `buf`, no copy)."""
        head = np.frombuffer(buf, np.uint32, count=self.n_variable) if self.n_variable else ()
        start = 4 * self.n_variable + self.fixed_before + sum(int(head[i]) for i in self.variable_before)
        size = self.size if self.size is not None else int(head[len(self.variable_before)])
        data = buf[start : start + size]
        if self.encoding == "bytes" or self.encoding.count(":") == 2:
            return np.frombuffer(data, self.dtype)  # shape stored in the index (or raw bytes)
        if self.encoding == "ndarray":
            raise DataError("ndarray columns without a dtype are not supported for tokens")
        byte = data[0]
        ndim, code = byte >> 2, byte & 3
        if ndim != 1:
            raise DataError(f"tokens must be 1-D arrays, found {ndim}-D")
        return np.frombuffer(data, self.dtype, offset=1 + (1 << code))


class Shard:
    """Random access to the samples of one uncompressed shard file, through a memory map."""

    def __init__(self, path: Path, entry: dict[str, Any]) -> None:
        self.path = path
        self.layout = TokenLayout.of(entry)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
        self._view = memoryview(self._mm)
        n = int(np.frombuffer(self._view, np.uint32, count=1)[0]) if len(self._view) >= 4 else -1
        if n != entry["samples"]:
            raise DataError(
                f"{path}: holds {n} samples but index.json says {entry['samples']}; the shard is damaged"
            )
        self.offsets = np.frombuffer(self._view, np.uint32, count=n + 1, offset=4).astype(np.int64)
        if self.offsets[-1] != len(self._view):
            raise DataError(
                f"{path}: sample offsets end at {self.offsets[-1]} but the file has {len(self._view)} bytes"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        return self.layout.decode(self._view[self.offsets[i] : self.offsets[i + 1]])
