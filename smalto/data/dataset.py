"""One MDS split (a folder with index.json), local or behind any fsspec URL, with random access to samples.

Local uncompressed shards are memory-mapped where they lie. Remote shards, and compressed ones, are fetched
lazily on first use into a cache folder (downloads go to a temporary name and are renamed, so concurrent
workers never see half a file), verified against the index's hashes, decompressed, and evicted
least-recently-used when the cache grows past its limit.

Safety. A dataset may come from a stranger: the index's file names are plain names (checked by `parse_index`, and
every joined path is checked to stay in its folder), and each shard is bounds-checked whenever it is opened and
hashed against the index the first time this process opens it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from smalto.data.mds import (
    CHUNK_BYTES,
    INDEX,
    Digests,
    Shard,
    check_basename,
    check_digests,
    decompress_file,
    parse_index,
)
from smalto.errors import ConfigError, DataError

_OPEN_SHARDS = 64  # memory maps kept open per dataset (file descriptors are finite)


def is_url(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p for p in parts if p)]) if is_url(base) else str(Path(base, *parts))


def parse_bytes(value: int | str | None) -> int | None:
    """`cache_limit` as an int or a string like "20gb" / "512mb"."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", value.lower())
    if not m:
        raise ConfigError(f"cache_limit {value!r} is not a size; write e.g. 50gb, 512mb or a byte count")
    unit = m.group(2)[:1]
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


def read_text(path: str) -> str | None:
    """The text of a local file or URL, or None when it does not exist."""
    if not is_url(path):
        return Path(path).read_text() if Path(path).is_file() else None
    fs, p = _fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return f.read().decode()


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise DataError(
            f"reading {url} needs `fsspec` (and its backend, e.g. s3fs): pip install 'smalto[data]'"
        ) from None
    try:
        fs, p = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url}: {e}") from None
    return fs, p


def inside(folder: Path, name: str, where: str) -> Path:
    """`folder / name`, refused unless it lies inside `folder` (names are checked by `parse_index` already; this
    keeps every joined path honest on its own)."""
    check_basename(name, where)
    path = folder / name
    base = os.path.normpath(folder)
    if os.path.commonpath([base, os.path.normpath(path)]) != base:
        raise DataError(f"{where} {name!r} leaves the folder {folder}")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMALTO_CACHE", Path.home() / ".cache" / "smalto" / "shards"))


class MDSDataset:
    """Samples of one split, numbered 0..len-1 across its shards in index order."""

    def __init__(
        self,
        root: str,
        *,
        cache_dir: str | Path | None = None,
        cache_limit: int | None = None,
        verify: bool = True,
    ) -> None:
        self.root = root
        text = read_text(join(root, INDEX))
        if text is None:
            raise DataError(
                f"no {INDEX} in {root}: point the source at a folder written by `smalto data` or Streaming"
            )
        self.entries = parse_index(text, join(root, INDEX))
        counts = np.array([e["samples"] for e in self.entries], np.int64)
        self.ends = np.cumsum(counts)
        self.remote = is_url(root)
        key = hashlib.sha1(root.encode()).hexdigest()[:16]
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache = self.cache_root / key
        self.cache_limit = cache_limit
        self.verify = verify
        self._open: OrderedDict[int, Shard] = OrderedDict()
        self._verified: set[int] = set()  # shards whose hashes this process has checked

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # memory maps do not travel to dataloader workers
        return state

    def tokens(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.ends, i, side="right"))
        shard = self._shard(s)
        return shard.tokens(i - (int(self.ends[s - 1]) if s else 0))

    def _shard(self, s: int) -> Shard:
        shard = self._open.get(s)
        if shard is not None:
            self._open.move_to_end(s)
            return shard
        entry = self.entries[s]
        path = self._local_raw(s, entry)
        shard = Shard(path, entry, verify=self.verify and s not in self._verified)
        self._verified.add(s)
        self._open[s] = shard
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def _local_raw(self, s: int, entry: dict[str, Any]) -> Path:
        """A local path to the uncompressed shard `s`, fetching and decompressing into the cache if needed."""
        raw, zipped = entry["raw_data"], entry.get("zip_data")
        where = f"{join(self.root, INDEX)}: shard {s} raw_data.basename"
        if not self.remote:
            local = inside(Path(self.root), raw["basename"], where)
            if local.is_file() or not zipped:
                if not local.is_file():
                    raise DataError(f"shard {local} listed in {self.root}/{INDEX} is missing")
                return local
        target = inside(self.cache, raw["basename"], where)
        if target.is_file():
            os.utime(target)  # mark as recently used for eviction
            return target
        self.cache.mkdir(parents=True, exist_ok=True)
        self._evict(need=raw["bytes"])
        # fetched, checked and decompressed a chunk at a time through temporary files: a shard of long rows is never
        # held in memory, and concurrent workers never see half a file
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{id(self)}")
        tmp.parent.mkdir(parents=True, exist_ok=True)  # a merged index names sub-folders
        fetched = tmp.with_name(tmp.name + ".zstd") if zipped else tmp
        info = zipped or raw
        src = join(self.root, info["basename"])
        try:
            seen = self._fetch(info["basename"], fetched, (info.get("hashes") or {}).keys())
            if self.verify:
                check_digests(seen.hexdigests(), info.get("hashes") or {}, src)
            if zipped:
                seen = decompress_file(entry["compression"], fetched, tmp, (raw.get("hashes") or {}).keys())
                if self.verify:
                    check_digests(seen.hexdigests(), raw.get("hashes") or {}, f"{src} (decompressed)")
            if seen.size != raw["bytes"]:
                raise DataError(
                    f"{join(self.root, raw['basename'])}: {seen.size} bytes, index.json says {raw['bytes']}"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
            fetched.unlink(missing_ok=True)
        if self.verify:
            self._verified.add(s)  # hashed just now
        return target

    def _fetch(self, basename: str, dst: Path, algos: Iterable[str]) -> Digests:
        """Copy a shard file of the dataset to `dst` a chunk at a time; returns its size and hashes."""
        src = join(self.root, basename)
        seen = Digests(algos)
        try:
            if self.remote:
                fs, p = _fs(src)
                fin = fs.open(p, "rb")
            else:
                fin = open(src, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            raise DataError(f"shard {src} listed in {join(self.root, INDEX)} is missing") from None
        with fin, open(dst, "wb") as out:
            while chunk := fin.read(CHUNK_BYTES):
                seen.update(chunk)
                out.write(chunk)
        return seen

    def _evict(self, need: int) -> None:
        """Drop least-recently-used cached shards (of any dataset under the cache root) to stay under the limit."""
        if self.cache_limit is None:
            return
        if need > self.cache_limit:
            raise ConfigError(
                f"cache_limit {self.cache_limit} bytes is smaller than one shard ({need} bytes); raise it"
            )
        files = [
            (p.stat().st_mtime, p.stat().st_size, p)
            for p in self.cache_root.glob("*/shard.*")
            if ".tmp-" not in p.name
        ]
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda t: t[0]):
            if total + need <= self.cache_limit:
                break
            # An open memory map stays valid after unlink, so evicting a shard another worker reads is safe.
            path.unlink(missing_ok=True)
            total -= size


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_url(path) else str(Path(path).parent)


def read_metadata(root: str) -> dict[str, Any] | None:
    """smalto_data.json of a dataset made by `smalto data`: in the split folder or up to two levels above."""
    base = root
    for _ in range(3):
        text = read_text(join(base, "smalto_data.json"))
        if text:
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{join(base, 'smalto_data.json')}: not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise DataError(f"{join(base, 'smalto_data.json')}: expected a JSON object")
            return meta
        base = parent(base)
    return None
