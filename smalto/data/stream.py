"""Token shards → training batches: mixing, deterministic shuffle, rank/worker sharding, exact resumption.

Use from the training loop::

    from smalto.data.stream import DataConfig, build_loader

    cfg = DataConfig.from_dict(yaml_cfg["data"])        # unknown keys raise ConfigError
    loader = build_loader(cfg, rank=rank, world_size=world_size,
                          micro_batch_size=8, global_batch_size=256)
    loader.load_state_dict(ckpt["data"])                 # optional: resume exactly
    for batch in loader:                                 # endless: epochs follow each other
        batch["input_ids"]    # (micro_batch, seq_len) int64
        batch["labels"]       # same as input_ids, -100 on padding; NOT shifted (the loss shifts)
        batch["sequence_id"]  # (micro_batch, seq_len) int64: document index within the row, -1 on padding
        ...
        state = loader.state_dict()  # at a global-batch boundary: {"epoch", "sample_in_epoch", ...}
        loader.source_tokens()       # {source name: token slots consumed by all ranks so far}

Order. Every epoch has a global order of samples (see `smalto.data.plan`) fixed by `seed`. Global step k
of an epoch takes positions [k·G, (k+1)·G) with G = global_batch_size; rank r takes the r-th contiguous
slice of G/world_size samples, as micro-batches of `micro_batch_size` (G / (world_size · micro_batch_size)
of them per step: the gradient-accumulation count). The last partial global batch of an epoch is dropped.
Dataloader workers take micro-batches round-robin (worker w yields micro-batches w, w+n, ...), which is the
order in which torch's DataLoader hands them out, so the stream a rank sees does not depend on the number of
workers, and the concatenation of all ranks' micro-batches of a step does not depend on the number of ranks.

Resumption. The state is the position reached in the global order (epoch, sample_in_epoch) plus the global
batch size and seed it assumes; loading it into a loader with any world size or worker count continues with
the very next global batch. Take it at a global-batch boundary (after a whole optimizer step), which is
where checkpoints are taken; elsewhere `state_dict()` raises.

Sequence ids. Within a row, a document ends with EOS: `sequence_id` counts the EOS tokens before each
position, so tokens of one document share an id (EOS included) and attention can be masked across
packed documents. Samples shorter than seq_len (from `--no-wrap` data) are padded with EOS, labels -100,
sequence_id -1; longer ones are cut to seq_len.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalto.data.dataset import MDSDataset, join, parse_bytes, read_metadata, read_text
from smalto.data.plan import epoch_counts, epoch_order
from smalto.errors import ConfigError, DataError, build, check_keys


@dataclass(kw_only=True)
class SourceConfig:
    path: str
    """Local folder or fsspec URL of a dataset (the folder holding train/ and val/, or a split folder)."""
    split: str | None = None
    """Subfolder to read (e.g. train or val); None: `path` itself if it holds index.json, else path/train."""
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    name: str | None = None
    """Name used in per-source token accounting; defaults to the folder name."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "data.sources[]") -> SourceConfig:
        return build(cls, d, where)


@dataclass(kw_only=True)
class DataConfig:
    sources: list[SourceConfig]
    seq_len: int = 2048
    shuffle: bool = True
    seed: int = 17
    num_workers: int = 0
    cache_dir: str | None = None
    """Where remote or compressed shards are kept; default $SMALTO_CACHE or ~/.cache/smalto/shards."""
    cache_limit: int | str | None = None
    """Bytes (or "50gb") the cache may hold; least recently used shards are evicted."""
    epoch_size: int | None = None
    """Samples per epoch when sources use `proportion`; default: the sum of the source sizes."""
    shuffle_block_size: int = 1 << 18
    eos_id: int | None = None
    """EOS token id; default: read from smalto_data.json (datasets written by other tools need it set)."""
    verify_hashes: bool = True
    prefetch_factor: int = 2

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "data") -> DataConfig:
        """Unknown keys, missing sources and values of the wrong type raise ConfigError naming the key."""
        if isinstance(d, dict) and (not d.get("sources") or not isinstance(d["sources"], list)):
            check_keys(where, d, [f.name for f in dataclasses.fields(cls)])
            raise ConfigError(f"{where}.sources must be a non-empty list of {{path: ...}} mappings")
        return build(cls, d, where)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one dataset path")
        for i, s in enumerate(self.sources):
            given = [k for k in ("proportion", "repeat", "choose") if getattr(s, k) is not None]
            if len(given) > 1:
                raise ConfigError(f"data.sources[{i}] sets {' and '.join(given)}; set at most one")
            for k in given:
                if getattr(s, k) < 0:
                    raise ConfigError(f"data.sources[{i}].{k} must not be negative")
        uses_prop = [s.proportion is not None for s in self.sources]
        if any(uses_prop) and not all(uses_prop):
            raise ConfigError(
                "either every data source sets `proportion` or none does (then use repeat/choose)"
            )
        if any(uses_prop) and sum(s.proportion or 0 for s in self.sources) <= 0:
            raise ConfigError("data source proportions sum to 0")
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be positive, got {self.seq_len}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be ≥ 0, got {self.num_workers}")
        self.cache_limit = parse_bytes(self.cache_limit)


def _split_root(src: SourceConfig) -> str:
    if src.split:
        return join(src.path, src.split)
    if read_text(join(src.path, "index.json")) is not None:
        return src.path
    return join(src.path, "train")


def sequence_ids(input_ids: np.ndarray, eos_id: int, lengths: np.ndarray) -> np.ndarray:
    """Per row, the number of EOS tokens strictly before each position; -1 past the row's length."""
    is_eos = (input_ids == eos_id).astype(np.int64)
    seq = np.cumsum(is_eos, axis=1) - is_eos
    seq[np.arange(input_ids.shape[1])[None, :] >= lengths[:, None]] = -1
    return seq


class StreamingTextDataset(torch.utils.data.IterableDataset):
    """One rank's micro-batches. Prefer `build_loader`, which wraps it with workers and resumption."""

    def __init__(
        self, cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int, global_batch_size: int
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if global_batch_size % (world_size * micro_batch_size):
            raise ConfigError(
                f"global_batch_size ({global_batch_size}) must be a multiple of world_size × micro_batch_size "
                f"({world_size} × {micro_batch_size})"
            )
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.micro, self.global_batch = micro_batch_size, global_batch_size
        self.accum = global_batch_size // (world_size * micro_batch_size)
        self.datasets = [
            MDSDataset(
                _split_root(s),
                cache_dir=cfg.cache_dir,
                cache_limit=parse_bytes(cfg.cache_limit),
                verify=cfg.verify_hashes,
            )
            for s in cfg.sources
        ]
        self.names = [
            s.name or Path(s.path.rstrip("/")).name or f"source{i}" for i, s in enumerate(cfg.sources)
        ]
        for name, ds in zip(self.names, self.datasets, strict=True):
            if len(ds) == 0:
                raise DataError(f"data source {name!r} ({ds.root}) holds no samples")
        self.eos_id = cfg.eos_id if cfg.eos_id is not None else self._eos_from_metadata()
        self.counts = epoch_counts(
            [len(d) for d in self.datasets],
            proportions=[s.proportion for s in cfg.sources],
            repeats=[s.repeat for s in cfg.sources],
            chooses=[s.choose for s in cfg.sources],
            epoch_size=cfg.epoch_size,
        )
        self.epoch_samples = sum(self.counts)
        self.steps_per_epoch = self.epoch_samples // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"an epoch has {self.epoch_samples} samples, fewer than one global batch ({global_batch_size})"
            )
        self.micro_per_epoch = self.steps_per_epoch * self.accum
        self.start = 0  # rank-local micro-batch counter to start from (set by the loader)
        self.max_epochs: int | None = None
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

    def _eos_from_metadata(self) -> int:
        ids = set()
        for s, ds in zip(self.cfg.sources, self.datasets, strict=True):
            meta = read_metadata(ds.root)
            if meta is None:
                raise ConfigError(
                    f"data source {s.path} has no smalto_data.json; set data.eos_id to the tokenizer's EOS id"
                )
            ids.add(int(meta["tokenizer"]["eos_id"]))
        if len(ids) > 1:
            raise ConfigError(
                f"data sources were tokenized with different EOS ids {sorted(ids)}; use one tokenizer"
            )
        return ids.pop()

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._plan is None or self._plan[0] != epoch:
            src, idx = epoch_order(
                [d.ends for d in self.datasets],
                self.counts,
                seed=self.cfg.seed,
                epoch=epoch,
                shuffle=self.cfg.shuffle,
                block=self.cfg.shuffle_block_size,
            )
            self._plan = (epoch, src, idx)
        return self._plan[1], self._plan[2]

    def positions(self, c: int) -> tuple[int, np.ndarray]:
        """Epoch and global positions of this rank's micro-batch number `c` (counted from the first epoch)."""
        epoch, m = divmod(c, self.micro_per_epoch)
        step, j = divmod(m, self.accum)
        first = step * self.global_batch + self.rank * (self.global_batch // self.world_size) + j * self.micro
        return epoch, np.arange(first, first + self.micro)

    def batch(self, c: int) -> dict[str, torch.Tensor]:
        epoch, pos = self.positions(c)
        src, idx = self.order(epoch)
        T = self.cfg.seq_len
        ids = np.full((len(pos), T), self.eos_id, np.int64)
        lengths = np.empty(len(pos), np.int64)
        for row, p in enumerate(pos):
            toks = self.datasets[src[p]].tokens(int(idx[p]))[:T]
            ids[row, : len(toks)] = toks
            lengths[row] = len(toks)
        labels = ids.copy()
        labels[np.arange(T)[None, :] >= lengths[:, None]] = -100
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "sequence_id": torch.from_numpy(sequence_ids(ids, self.eos_id, lengths)),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        c = self.start + worker
        while self.max_epochs is None or c < self.max_epochs * self.micro_per_epoch:
            yield self.batch(c)
            c += workers


class StreamingLoader:
    """Iterates one rank's micro-batches through a torch DataLoader and knows where it stands."""

    def __init__(
        self,
        dataset: StreamingTextDataset,
        *,
        num_workers: int,
        prefetch_factor: int = 2,
        generator_seed: int = 0,
    ):
        self.dataset = dataset
        self.generator_seed = generator_seed
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.consumed = 0  # rank-local micro-batches handed to the caller, from the first epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.start = self.consumed
        # the DataLoader draws its workers' base seed from this generator, not from the global one that dropout
        # uses: a resumed run starts a new iterator after restoring the RNG state, and must not move that stream
        generator = torch.Generator().manual_seed(self.generator_seed)
        kwargs: dict[str, Any] = {"batch_size": None, "num_workers": self.num_workers, "generator": generator}
        if self.num_workers:
            kwargs.update(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        for batch in torch.utils.data.DataLoader(self.dataset, **kwargs):
            self.consumed += 1
            yield batch

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank."""
        return self.dataset.micro_per_epoch

    @property
    def epoch(self) -> int:
        return self.consumed // self.dataset.micro_per_epoch

    def _global_position(self) -> tuple[int, int]:
        ds = self.dataset
        epoch, m = divmod(self.consumed, ds.micro_per_epoch)
        if m % ds.accum:
            raise RuntimeError(
                f"state_dict() taken in the middle of a global batch ({m % ds.accum} of {ds.accum} micro-batches); "
                "take it after the optimizer step"
            )
        return epoch, m // ds.accum * ds.global_batch

    def state_dict(self) -> dict[str, int]:
        epoch, sample = self._global_position()
        return {
            "epoch": epoch,
            "sample_in_epoch": sample,
            "global_batch_size": self.dataset.global_batch,
            "seed": self.dataset.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        ds = self.dataset
        for key in ("global_batch_size", "seed"):
            mine = ds.global_batch if key == "global_batch_size" else ds.cfg.seed
            if state[key] != mine:
                raise ConfigError(
                    f"cannot resume the data stream exactly: {key} was {state[key]}, now {mine}; keep it unchanged"
                )
        step, rest = divmod(int(state["sample_in_epoch"]), ds.global_batch)
        if rest:
            raise ConfigError(
                f"data state sample_in_epoch {state['sample_in_epoch']} is not a multiple of the global batch"
            )
        self.consumed = int(state["epoch"]) * ds.micro_per_epoch + step * ds.accum

    def source_samples(self) -> dict[str, int]:
        """Samples drawn from each source by all ranks together (the order is global, so no communication)."""
        ds = self.dataset
        epoch, m = divmod(self.consumed, ds.micro_per_epoch)
        done = m // ds.accum * ds.global_batch + (m % ds.accum) * ds.micro * ds.world_size
        src, _ = ds.order(epoch)
        now = np.bincount(src[:done], minlength=len(ds.names))
        return {n: int(epoch * c + now[i]) for i, (n, c) in enumerate(zip(ds.names, ds.counts, strict=True))}

    def source_tokens(self) -> dict[str, int]:
        """Token slots (samples × seq_len) drawn from each source by all ranks together."""
        return {k: v * self.dataset.cfg.seq_len for k, v in self.source_samples().items()}


def check_vocab(loaders: Iterable[StreamingLoader | None], vocab_size: int) -> None:
    """Refuse data the model cannot embed, before the first step rather than as an IndexError (or a device assert)
    inside it: a source whose smalto_data.json records a larger tokenizer vocabulary than `vocab_size`, then any token
    id of each loader's first micro-batch outside [0, vocab_size) (the check for data made by other tools)."""
    fix = "tokenize the data with the model's tokenizer, or set model.vocab_size to cover it"
    for loader in loaders:
        if loader is None:
            continue
        ds = loader.dataset
        for name, d in zip(ds.names, ds.datasets, strict=True):
            tok = (read_metadata(d.root) or {}).get("tokenizer")
            tok = tok if isinstance(tok, dict) else {}
            size = tok.get("vocab_size")
            if isinstance(size, int) and size > vocab_size:
                by = f" (tokenizer {tok['name']})" if tok.get("name") else ""
                raise DataError(
                    f"data source {name!r} ({d.root}) was tokenized with a vocabulary of {size} tokens{by}, "
                    f"but model.vocab_size is {vocab_size}; {fix}"
                )
        ids = ds.batch(loader.consumed)["input_ids"]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise DataError(
                f"the data ({', '.join(d.root for d in ds.datasets)}) holds token id {bad}, outside the model's "
                f"vocabulary of {vocab_size} tokens (model.vocab_size); {fix}"
            )


def build_loader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_size: int,
    global_batch_size: int,
    seed: int | None = None,
    epochs: int | None = None,
) -> StreamingLoader:
    """The loader for one rank. `seed` overrides cfg.seed; `epochs=None` streams forever (training). Its
    DataLoader has its own generator, seeded from the seed and the rank, and leaves the global RNG alone."""
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    ds = StreamingTextDataset(
        cfg,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
    )
    ds.max_epochs = epochs
    return StreamingLoader(
        ds,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        generator_seed=(cfg.seed * 1_000_003 + rank) % 2**63,
    )
