"""Finetuning sources → the training and held-out streams, with the pretraining stream's order and resumption.

Each source's rows are preprocessed, tokenized, masked and packed into rows of `seq_len` tokens in memory
(smalto.data.finetune); a fraction of each source's examples can be held out for evaluation, and `eval_sources`
are held out whole. The packed rows then go through the same global order as token shards
(`smalto.data.plan`: mixing by proportion / repeat / choose, seeded shuffle per epoch, rank slices, exact resume
from (epoch, sample_in_epoch)) by subclassing the pretraining stream: only where a row comes from differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from smalto.data.finetune import FinetuneConfig, FinetuneDataset
from smalto.data.plan import epoch_counts
from smalto.data.stream import StreamingLoader, StreamingTextDataset
from smalto.errors import ConfigError, DataError, build, check_choice


@dataclass(kw_only=True)
class FinetuneSourceConfig:
    path: str
    """A JSONL / JSON / Parquet / CSV file, a folder of them, or a `datasets` save_to_disk folder."""
    preprocessing: str = "prompt_response"
    """prompt_response, dolly, alpaca, chat, or module:function (smalto.data.preprocess)."""
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    name: str | None = None


@dataclass(kw_only=True)
class FinetuneDataConfig:
    sources: list[FinetuneSourceConfig]
    eval_sources: list[FinetuneSourceConfig] = field(default_factory=list)
    """Sources used whole for the held-out loss and sample prompts."""
    eval_fraction: float = 0.0
    """Fraction of every training source's examples held out for evaluation (chosen by `seed`)."""
    seq_len: int = 2048
    packing: bool = True
    """Pack several examples in a row; attention stays within each (sequence ids)."""
    target_responses: str = "last"
    target_prompts: str = "none"
    too_long: str = "drop"
    on_error: str = "raise"
    shuffle: bool = True
    seed: int = 17
    epoch_size: int | None = None
    """Rows per epoch when sources use `proportion`; default: the sum of the source sizes."""
    shuffle_block_size: int = 1 << 18
    num_workers: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "data") -> FinetuneDataConfig:
        if isinstance(d, dict) and (not d.get("sources") or not isinstance(d["sources"], list)):
            raise ConfigError(
                f"{where}.sources must be a non-empty list of {{path: ..., preprocessing: ...}}"
            )
        return build(cls, d, where)

    def __post_init__(self) -> None:
        self.sources = [_source(s, f"data.sources[{i}]") for i, s in enumerate(self.sources)]
        self.eval_sources = [_source(s, f"data.eval_sources[{i}]") for i, s in enumerate(self.eval_sources)]
        check_sources(self.sources, self.eval_fraction)
        check_choice("data.on_error", self.on_error, ("raise", "skip"))
        self.example_config("")  # the per-source checks (targets, too_long, seq_len)

    def example_config(self, path: str, preprocessing: str = "prompt_response") -> FinetuneConfig:
        return FinetuneConfig(
            path=path,
            seq_len=self.seq_len,
            target_responses=self.target_responses,
            target_prompts=self.target_prompts,
            too_long=self.too_long,
            packing=self.packing,
            on_error=self.on_error,
            preprocessing=preprocessing,
        )


def check_sources(sources: list[Any], eval_fraction: float) -> None:
    """The mixing settings of data.sources (at most one of proportion / repeat / choose on a source, not negative;
    proportion on every source or on none) and data.eval_fraction in [0, 1)."""
    for i, s in enumerate(sources):
        given = [k for k in ("proportion", "repeat", "choose") if getattr(s, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"data.sources[{i}] sets {' and '.join(given)}; set at most one")
        if any(getattr(s, k) < 0 for k in given):
            raise ConfigError(f"data.sources[{i}].{given[0]} must not be negative")
    props = [s.proportion is not None for s in sources]
    if any(props) and not all(props):
        raise ConfigError("either every data source sets `proportion` or none does (then use repeat/choose)")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction = {eval_fraction} must be in [0, 1)")


def _source(s: Any, where: str) -> FinetuneSourceConfig:
    return s if isinstance(s, FinetuneSourceConfig) else build(FinetuneSourceConfig, s, where)


class _Rows:
    """A source's packed rows where the pretraining stream expects a dataset: one "shard" of len(rows) samples."""

    def __init__(self, data: FinetuneDataset, name: str):
        self.data, self.root = data, name
        self.ends = np.array([len(data)], np.int64)

    def __len__(self) -> int:
        return len(self.data)


class FinetuneStream(StreamingTextDataset):
    """One rank's micro-batches of packed finetuning rows (input_ids, labels with -100 off targets, sequence_id)."""

    def __init__(
        self,
        cfg: FinetuneDataConfig,
        parts: list[tuple[str, FinetuneDataset, FinetuneSourceConfig]],
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        global_batch_size: int,
    ):
        torch.utils.data.IterableDataset.__init__(self)
        self.cfg = cfg  # type: ignore[assignment]  # read for seq_len, seed, shuffle, shuffle_block_size
        self.rank, self.world_size = rank, world_size
        self.micro, self.global_batch = micro_batch_size, global_batch_size
        self.accum = global_batch_size // (world_size * micro_batch_size)
        self.names = [name for name, _, _ in parts]
        self.datasets = [_Rows(data, name) for name, data, _ in parts]  # type: ignore[misc]
        self.eos_id = parts[0][1].pad_id
        srcs = [s for _, _, s in parts]
        self.counts = epoch_counts(
            [len(d) for d in self.datasets],
            proportions=[s.proportion for s in srcs],
            repeats=[s.repeat for s in srcs],
            chooses=[s.choose for s in srcs],
            epoch_size=cfg.epoch_size,
        )
        self.epoch_samples = sum(self.counts)
        self.steps_per_epoch = self.epoch_samples // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the finetuning data ({', '.join(self.names)}) packs into {self.epoch_samples} rows of "
                f"{cfg.seq_len} tokens, fewer than one global batch ({global_batch_size}); add data, lower "
                "train.global_batch_size or turn packing off"
            )
        self.micro_per_epoch = self.steps_per_epoch * self.accum
        self.start = 0
        self.max_epochs: int | None = None
        self._plan = None

    def batch(self, c: int) -> dict[str, torch.Tensor]:
        epoch, pos = self.positions(c)
        src, idx = self.order(epoch)
        rows = [self.datasets[src[p]].data[int(idx[p])] for p in pos]  # type: ignore[attr-defined]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def read_sources(
    cfg: FinetuneDataConfig, tokenizer: Any
) -> tuple[list[tuple[str, FinetuneDataset, FinetuneSourceConfig]], list[tuple[str, FinetuneDataset, Any]]]:
    """(training parts, held-out parts), each (name, packed dataset, source config)."""
    train, held = [], []
    for i, s in enumerate(cfg.sources):
        name = s.name or f"source{i}"
        data = FinetuneDataset(cfg.example_config(s.path, s.preprocessing), tokenizer)
        if cfg.eval_fraction > 0:
            data, out = data.split(cfg.eval_fraction, cfg.seed + i)
            held.append((name, out, s))
        train.append((name, data, s))
    for i, s in enumerate(cfg.eval_sources):
        held.append(
            (s.name or f"eval{i}", FinetuneDataset(cfg.example_config(s.path, s.preprocessing), tokenizer), s)
        )
    return train, held


def build_finetune_loaders(
    cfg: FinetuneDataConfig,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
) -> tuple[StreamingLoader, StreamingLoader | None, list[FinetuneDataset]]:
    """The training loader, the held-out loader (one pass, in order; None without held-out data) and the held-out
    datasets (their prompts are the sample prompts)."""
    train, held = read_sources(cfg, tokenizer)
    stream = FinetuneStream(
        cfg, train, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
    )  # fmt: skip
    loader = StreamingLoader(
        stream, num_workers=cfg.num_workers, generator_seed=(cfg.seed * 1_000_003 + rank) % 2**63
    )
    if not held:
        return loader, None, []
    rows = sum(len(d) for _, d, _ in held)
    per_step = micro_batch_size * world_size
    if rows < per_step:
        raise DataError(
            f"the held-out finetuning data packs into {rows} rows, fewer than one evaluation batch ({per_step}); "
            "raise data.eval_fraction or add eval_sources"
        )
    plain = [(n, d, FinetuneSourceConfig(path=n)) for n, d, _ in held]
    vcfg = dataclasses.replace(cfg, shuffle=False, epoch_size=None)
    vstream = FinetuneStream(
        vcfg,
        plain,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        global_batch_size=per_step,
    )
    vstream.max_epochs = 1
    return loader, StreamingLoader(vstream, num_workers=0), [d for _, d, _ in held]
