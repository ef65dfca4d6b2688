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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


def _hasher(algo: str) -> Any:
    """An incremental hash object (update / hexdigest) for Streaming's algorithm name; None when unavailable here."""
    if algo.startswith("xxh"):
        try:
            import xxhash
        except ImportError:
            return None
        make = getattr(xxhash, algo, None)
        return make() if make else None
    if algo in hashlib.algorithms_available:
        return hashlib.new(algo)
    return None


def file_hash(algo: str, data: bytes | memoryview) -> str | None:
    """Hex digest with Streaming's algorithm names; None when the algorithm is unavailable here."""
    h = _hasher(algo)
    if h is None:
        return None
    h.update(data)
    return str(h.hexdigest())


class Digests:
    """The size and hashes of bytes seen a piece at a time, so a shard is hashed while it streams to or from disk
    instead of being held whole. Algorithms unavailable here are left out (as `file_hash` returns None)."""

    def __init__(self, algos: Iterable[str]) -> None:
        self.size = 0
        self._h = {a: h for a in algos if (h := _hasher(a)) is not None}

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        for h in self._h.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {a: str(h.hexdigest()) for a, h in self._h.items()}


def verify_hashes(data: bytes | memoryview, expected: dict[str, str], where: str) -> None:
    """Check every digest we can compute; the index may list algorithms we lack (xxh without xxhash)."""
    got = {a: d for a in expected if (d := file_hash(a, data)) is not None}
    check_digests(got, expected, where)


def check_digests(got: dict[str, str], expected: dict[str, str], where: str) -> None:
    """Refuse a file whose computed digests (`got`: the algorithms available here) differ from the index's."""
    for algo, want in expected.items():
        if algo in got and got[algo] != want:
            raise DataError(
                f"{where}: {algo} hash mismatch (index says {want}, file has {got[algo]}); delete the file or re-download"
            )


CHUNK_BYTES = 1 << 20  # bytes per read while a shard streams between disk, network and (de)compressor


def decompress_file(compression: str, src: Path, dst: Path, algos: Iterable[str]) -> Digests:
    """Decompress the shard `src` into `dst` a chunk at a time; returns the decompressed bytes' size and hashes."""
    if not compression.startswith("zstd"):
        raise DataError(f"shard compression {compression!r} is not supported (only zstd)")
    zstd = _zstd()
    seen = Digests(algos)
    try:
        with open(src, "rb") as fin, zstd.ZstdDecompressor().stream_reader(fin) as z, open(dst, "wb") as out:
            while chunk := z.read(CHUNK_BYTES):
                seen.update(chunk)
                out.write(chunk)
    except zstd.ZstdError as e:
        raise DataError(f"{src}: not a valid zstd stream ({e}); delete the file or re-download") from None
    return seen


class _Sink:
    """A write target that hashes what passes through, and writes it to `file` when one is given."""

    def __init__(self, file: BinaryIO | None, algos: Iterable[str]) -> None:
        self.file = file
        self.seen = Digests(algos)

    def write(self, data: bytes | memoryview) -> int:
        self.seen.update(data)
        if self.file is not None:
            self.file.write(data)
        return len(data)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()


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
        """Write the shard straight from the samples held (once) in memory: header, offsets, config, then each
        sample, hashed and (with compression) compressed as they stream to the file."""
        n = len(self._samples)
        sizes = np.array([0] + [len(s) for s in self._samples], np.int64)
        offsets = sizes.cumsum() + 4 + 4 * (n + 1) + len(self._config_bytes)
        head = np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + self._config_bytes
        raw_name = f"shard.{len(self.shards):05d}.mds"
        name = raw_name + ".zstd" if self.compression else raw_name
        with open(self.out / name, "wb") as f:
            if self.compression:
                raw, zipped = _Sink(None, self.hashes), _Sink(f, self.hashes)
                _, _, level = self.compression.partition(":")
                cctx = _zstd().ZstdCompressor(level=int(level or 3))
                with cctx.stream_writer(zipped, size=int(offsets[-1]), closefd=False) as z:
                    for piece in (head, *self._samples):
                        raw.write(piece)
                        z.write(piece)
            else:
                raw, zipped = _Sink(f, self.hashes), None
                for piece in (head, *self._samples):
                    raw.write(piece)
        raw_info = {"basename": raw_name, "bytes": raw.seen.size, "hashes": self._digests(raw.seen)}
        zip_info = None
        if zipped is not None:
            zip_info = {"basename": name, "bytes": zipped.seen.size, "hashes": self._digests(zipped.seen)}
        self.shards.append({**self.config, "samples": n, "raw_data": raw_info, "zip_data": zip_info})
        self._samples = []
        self._shard_bytes = 8 + len(self._config_bytes)

    def _digests(self, seen: Digests) -> dict[str, str | None]:
        got = seen.hexdigests()
        return {
            a: got.get(a) for a in self.hashes
        }  # None for an algorithm unavailable here, as file_hash gives

    def finish(self) -> list[dict[str, Any]]:
        if self._samples:
            self._flush()
        index = json.dumps({"version": 2, "shards": self.shards}, sort_keys=True)
        (self.out / INDEX).write_text(index)
        return self.shards


# ---- reading ----


def check_basename(name: Any, where: str) -> str:
    """`name` if it is a relative file name made of plain parts (`shard.00000.mds`, or `0/shard.00000.mds` as
    Streaming's merge_index writes for sub-folders). A shard name is joined to the dataset folder (read) and the cache
    folder (written), so `..` parts, absolute paths, backslashes and empty parts, which could reach outside them, are
    refused."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
        raise DataError(f"{where} is {name!r}, not a file name")
    parts = name.split("/")
    if "\\" in name or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
        raise DataError(
            f"{where} is {name!r}: smalto reads only relative file names inside the dataset folder "
            "(no '..', no absolute paths, no backslashes)"
        )
    return name


def _check_file(info: Any, where: str) -> None:
    if not isinstance(info, dict):
        raise DataError(f"{where} must be a mapping with basename, bytes and hashes, got {info!r}")
    check_basename(info.get("basename"), f"{where}.basename")
    size = info.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DataError(f"{where}.bytes is {size!r}, not a byte count")
    hashes = info.get("hashes")
    if hashes is not None and not (
        isinstance(hashes, dict) and all(isinstance(v, str) for v in hashes.values())
    ):
        raise DataError(f"{where}.hashes must map algorithm names to hex digests, got {hashes!r}")


def parse_index(text: str, where: str) -> list[dict[str, Any]]:
    """The shard entries of an index.json, checked enough that later errors cannot be cryptic and that no file
    name in it reaches outside its folder."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("version") != 2 or not isinstance(obj.get("shards"), list):
        raise DataError(f"{where}: not a Streaming index (expected version 2 with a 'shards' list)")
    for i, shard in enumerate(obj["shards"]):
        if not isinstance(shard, dict):
            raise DataError(f"{where}: shard {i} is {shard!r}, not a mapping")
        if shard.get("format") != "mds":
            raise DataError(
                f"{where}: shard {i} has format {shard.get('format')!r}; only 'mds' shards are supported"
            )
        columns: list[Any] = [shard.get(k) for k in ("column_names", "column_encodings", "column_sizes")]
        if not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) != 1:
            raise DataError(
                f"{where}: shard {i} needs column_names, column_encodings and column_sizes lists of one length"
            )
        if "tokens" not in shard["column_names"]:
            raise DataError(f"{where}: shard {i} has no 'tokens' column (columns: {shard['column_names']})")
        n = shard.get("samples")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 1 << 32:
            raise DataError(f"{where}: shard {i} samples is {n!r}, not a sample count")
        _check_file(shard.get("raw_data"), f"{where}: shard {i} raw_data")
        if shard.get("zip_data") is not None:
            _check_file(shard["zip_data"], f"{where}: shard {i} zip_data")
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
        if start + size > len(buf):
            raise ValueError(f"its tokens end at byte {start + size} of {len(buf)}")
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
    """Random access to the samples of one uncompressed shard file, through a memory map.

    Opening checks what a damaged or hostile file could otherwise turn into a crash hours later: the size the index
    gives, the sample count, that the offset table lies inside the file and only grows, and (with `verify`) the
    index's hashes. The dataset asks for hashing only the first time it opens a shard in a process."""

    def __init__(self, path: Path, entry: dict[str, Any], *, verify: bool = False) -> None:
        self.path = path
        self.layout = TokenLayout.of(entry)
        raw = entry["raw_data"]
        size = os.path.getsize(path)
        if size != raw["bytes"]:
            raise DataError(f"{path}: {size} bytes but index.json says {raw['bytes']}; the shard is damaged")
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._view = memoryview(self._mm)
        n = int(np.frombuffer(self._view, np.uint32, count=1)[0]) if size >= 4 else -1
        if n != entry["samples"]:
            raise DataError(
                f"{path}: holds {n} samples but index.json says {entry['samples']}; the shard is damaged"
            )
        table_end = 4 + 4 * (n + 1)
        if table_end > size:
            raise DataError(
                f"{path}: {size} bytes cannot hold the offsets of {n} samples; the shard is damaged"
            )
        self.offsets = np.frombuffer(self._view, np.uint32, count=n + 1, offset=4).astype(np.int64)
        if self.offsets[0] < table_end or (np.diff(self.offsets) < 0).any() or self.offsets[-1] != size:
            raise DataError(
                f"{path}: the sample offsets are not increasing positions from {table_end} to the file's end "
                f"({size} bytes); the shard is damaged"
            )
        if verify:
            verify_hashes(self._view, raw.get("hashes") or {}, str(path))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        try:
            return self.layout.decode(self._view[self.offsets[i] : self.offsets[i + 1]])
        except (ValueError, IndexError) as e:  # sizes inside the sample point past its end
            raise DataError(f"{self.path}: sample {i} is damaged ({e})") from None
