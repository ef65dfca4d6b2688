"""The `data` section of a DPO recipe, and its training and held-out streams of preference pairs.

Sources are read and tokenized whole (smalto.data.preference); a fraction of each can be held out for evaluation,
and `eval_sources` are held out whole. The pairs then go through finetuning's stream (smalto.data.finetune_stream:
mixing by proportion / repeat / choose, a seeded shuffle per epoch, rank slices, exact resume): one pair is one
sample, never packed with another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from smalto.data.finetune_stream import FinetuneSourceConfig, FinetuneStream, check_sources
from smalto.data.preference import PreferenceConfig, PreferenceDataset
from smalto.data.stream import StreamingLoader
from smalto.errors import ConfigError, DataError, build, check_choice


@dataclass(kw_only=True)
class PreferenceSourceConfig:
    path: str
    """A JSONL / JSON / Parquet / CSV file, a folder of them, or a `datasets` save_to_disk folder."""
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    name: str | None = None


@dataclass(kw_only=True)
class PreferenceDataConfig:
    sources: list[PreferenceSourceConfig]
    eval_sources: list[PreferenceSourceConfig] = field(default_factory=list)
    """Sources used whole for the held-out loss and reward accuracy."""
    eval_fraction: float = 0.0
    """Fraction of every training source's pairs held out for evaluation (chosen by `seed`)."""
    max_length: int = 1024
    """Tokens of prompt + completion in each of the chosen and the rejected sequence (TRL's max_length)."""
    max_prompt_length: int | None = None
    """Keep the prompt's last this many tokens first (as TRL 0.x's max_prompt_length); null = no limit."""
    max_completion_length: int | None = None
    """Keep a completion's first this many tokens first; null = no limit."""
    truncation_mode: str = "keep_start"
    """What `max_length` keeps: `keep_start` (a pair whose prompt fills it is dropped) or `keep_end`."""
    on_error: str = "raise"
    shuffle: bool = True
    seed: int = 17
    epoch_size: int | None = None
    """Pairs per epoch when sources use `proportion`; default: the sum of the source sizes."""
    shuffle_block_size: int = 1 << 18
    num_workers: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "data") -> PreferenceDataConfig:
        if isinstance(d, dict) and (not d.get("sources") or not isinstance(d["sources"], list)):
            raise ConfigError(f"{where}.sources must be a non-empty list of {{path: ...}}")
        d = dict(d)
        d.pop(
            "seq_len", None
        )  # the recipe loader's default; DPO's row length is max_length (load_dpo_config)
        return build(cls, d, where)

    @property
    def seq_len(self) -> int:
        """The row length the trainer plans attention for."""
        return self.max_length

    def __post_init__(self) -> None:
        self.sources = [_source(s, f"data.sources[{i}]") for i, s in enumerate(self.sources)]
        self.eval_sources = [_source(s, f"data.eval_sources[{i}]") for i, s in enumerate(self.eval_sources)]
        check_sources(self.sources, self.eval_fraction)
        check_choice("data.on_error", self.on_error, ("raise", "skip"))
        self.pair_config("")  # the truncation checks

    def pair_config(self, path: str) -> PreferenceConfig:
        return PreferenceConfig(
            path=path,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            max_completion_length=self.max_completion_length,
            truncation_mode=self.truncation_mode,
            on_error=self.on_error,
        )


def _source(s: Any, where: str) -> PreferenceSourceConfig:
    return s if isinstance(s, PreferenceSourceConfig) else build(PreferenceSourceConfig, s, where)


def read_pairs(
    cfg: PreferenceDataConfig, tokenizer: Any
) -> tuple[list[tuple[str, PreferenceDataset, Any]], list[tuple[str, PreferenceDataset, Any]]]:
    """(training parts, held-out parts), each (name, dataset, source config)."""
    train, held = [], []
    for i, s in enumerate(cfg.sources):
        name = s.name or f"source{i}"
        data = PreferenceDataset(cfg.pair_config(s.path), tokenizer)
        if cfg.eval_fraction > 0:
            data, out = data.split(cfg.eval_fraction, cfg.seed + i)
            held.append((name, out, s))
        train.append((name, data, s))
    for i, s in enumerate(cfg.eval_sources):
        held.append((s.name or f"eval{i}", PreferenceDataset(cfg.pair_config(s.path), tokenizer), s))
    return train, held


def build_preference_loaders(
    cfg: PreferenceDataConfig,
    tokenizer: Any,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
) -> tuple[StreamingLoader, StreamingLoader | None]:
    """The training loader and the held-out loader (one pass, in order; None without held-out pairs)."""
    train, held = read_pairs(cfg, tokenizer)
    stream = FinetuneStream(
        cfg,  # type: ignore[arg-type]  # reads seq_len, seed, shuffle, shuffle_block_size, epoch_size
        train,  # type: ignore[arg-type]  # a dataset of pairs where FinetuneStream takes packed rows
        rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
    )  # fmt: skip
    loader = StreamingLoader(
        stream, num_workers=cfg.num_workers, generator_seed=(cfg.seed * 1_000_003 + rank) % 2**63
    )
    if not held:
        return loader, None
    per_step = micro_batch_size * world_size
    if sum(len(d) for _, d, _ in held) < per_step:
        raise DataError(
            f"the held-out preference data has fewer pairs than one evaluation batch ({per_step}); "
            "raise data.eval_fraction or add eval_sources"
        )
    plain = [(n, d, FinetuneSourceConfig(path=n)) for n, d, _ in held]
    vstream = FinetuneStream(
        dataclasses.replace(cfg, shuffle=False, epoch_size=None),  # type: ignore[arg-type]
        plain,  # type: ignore[arg-type]
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        global_batch_size=per_step,
    )
    vstream.max_epochs = 1
    return loader, StreamingLoader(vstream, num_workers=0)
