"""A run's parts, built from the recipe: `setup(cfg, world)` → `Trainer` (model, optimizer, data, checkpoints, ...).

Building follows the recipe's order of dependence: seeds, the attention plan (it needs the step's shape), the model
(meta → kernels → parallelise → materialise), optimizer, schedule (its lengths need the tokens per step) — that much
is `build_trainer` — then data streams, autoresume from `latest` (or initial weights from `checkpoint.load_from`),
and last the logger, which starts at the step we resume from.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from smalto.config import RunConfig, duration_steps
from smalto.errors import ConfigError
from smalto.kernels import select
from smalto.kernels.loss import head_loss_for
from smalto.model.attention import AttentionPlan
from smalto.model.mpt import MPTForCausalLM
from smalto.train.adapters import build_qlora_model
from smalto.train.checkpoint import Checkpointer, load_weights
from smalto.train.guard import LossGuard
from smalto.train.metrics import RunLogger, lora_flops_per_token, peak_tflops, write_run_info
from smalto.train.optim import Schedule, build_optimizer
from smalto.train.parallel import World, build_model
from smalto.train.weight_cast import StepWeightCast, uses_step_cast

RECENT = 100  # losses of this launch kept in memory (TrainResult.losses)


@dataclass(kw_only=True)
class Trainer:
    """Everything a run holds, built from the recipe by `setup`; `step`, `tokens`, `seconds` are the loop state."""

    cfg: RunConfig
    world: World
    model: MPTForCausalLM
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    guard: LossGuard
    logger: RunLogger
    attention: AttentionPlan  # the training forwards' attention kernel, chosen once at setup
    autocast: Any
    micro: int
    accum: int
    tokens_per_step: int
    flops_per_token: int
    peak_tflops: float | None
    total_steps: int = 0
    eval_every: int = 1
    save_every: int = 1
    loader: Any = None
    val_loader: Any = None
    ckpt: Any = None  # Checkpointer
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    launch_seconds: float = 0.0  # training time of this launch only: train.time_limit applies per launch
    checkpoint: str | None = None
    first_loss: float | None = None  # the run's first and latest losses, for the summary and the result (the
    last_loss: float | None = (
        None  # history is in metrics.jsonl, so that trainer.json does not grow with steps)
    )
    losses: deque[float] = field(
        default_factory=lambda: deque(maxlen=RECENT)
    )  # this launch's latest, in memory
    last_eval: float | None = None
    first_eval: float | None = None  # the held-out loss before the first step (train.eval_first)
    weight_cast: StepWeightCast | None = None  # bf16 weights made once per step (one device, bf16)

    def out_of_time(self, limit: float) -> bool:
        """Ranks agree (the slowest rank's clock decides), or they would part ways at the next collective."""
        if limit == math.inf:
            return False
        spent = torch.tensor([self.launch_seconds], dtype=torch.float64, device=self.world.device)
        if self.world.world_size > 1:
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
        if float(spent) >= limit and self.step < self.total_steps:
            self.logger.print(
                f"time limit {self.cfg.train.time_limit} (this launch) reached at step {self.step}/{self.total_steps}"
            )
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "data": self.loader.state_dict(),
            "guard": self.guard.state_dict(),  # the window the guard judges by
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "last_eval": self.last_eval,
            "first_eval": self.first_eval,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.step, self.tokens, self.seconds = s["step"], s["tokens"], s["seconds"]
        self.loader.load_state_dict(s["data"])
        self.guard.load_state_dict(s["guard"])
        if "losses" in s:  # older checkpoints held the whole loss history
            s = {**s, "first_loss": (s["losses"] or [None])[0], "last_loss": (s["losses"] or [None])[-1]}
        self.first_loss, self.last_loss, self.last_eval = s["first_loss"], s["last_loss"], s["last_eval"]
        self.first_eval = s.get("first_eval")


def setup(cfg: RunConfig, world: World, loaders: Any = None) -> Trainer:
    """A run's `Trainer`: `build_trainer`, then its data streams and checkpoints, resumed from `latest` when
    there is one (or initial weights from `checkpoint.load_from`), and its logger started. `loaders(cfg, world)`,
    when given, makes the (training, held-out) loaders of an objective's own data (DPO's preference pairs)."""
    from rich.markup import escape

    from smalto.data.stream import build_loader, check_vocab
    from smalto.train.relaunch import check_relaunch

    # before anything is built or written: a relaunch the checkpoint cannot take is refused
    check_relaunch(cfg, warn=world.is_main)
    if cfg.prepare == "stdlib":
        from smalto.demo import prepare_stdlib

        if world.is_main:
            prepare_stdlib(cfg)
        world.barrier()
    elif cfg.prepare == "stdlib-instruct":
        from smalto.demo_instruct import prepare_instruct

        if world.is_main:
            prepare_instruct(cfg)
        world.barrier()
    elif cfg.prepare == "stdlib-preferences":
        from smalto.demo_dpo import prepare_preferences

        if world.is_main:
            prepare_preferences(cfg)
        world.barrier()
    # smalto finetune's examples (smalto/train/finetune.py) are read before anything is written (a bad row leaves
    # no run folder) and before the trainer is built (a max_duration in epochs needs the data's size)
    finetuning = cfg.base_model is not None
    if loaders is None and finetuning:
        from smalto.train.finetune import finetune_loaders as loaders
    if loaders is not None:
        made = loaders(cfg, world)
    else:
        check_data(cfg)  # every rank: a missing dataset is named in seconds, not after the model is built
    if world.is_main:
        check_paths(cfg)
    t = build_trainer(cfg, world)
    if loaders is not None:
        t.loader, t.val_loader = made
    else:
        t.loader = build_loader(
            cfg.data,
            rank=world.rank,
            world_size=world.world_size,
            micro_batch_size=t.micro,
            global_batch_size=cfg.train.global_batch_size,
        )
        t.val_loader = _val_loader(cfg, world, t.micro)
        check_vocab([t.loader, t.val_loader], cfg.model.vocab_size)
    # LoRA: checkpoints hold the trainable tensors and their optimizer state only (the base is in base_model)
    t.ckpt = Checkpointer(
        cfg.checkpoint.folder, world, keep_last=cfg.checkpoint.keep_last, trainable_only=cfg.lora is not None
    )
    latest = t.ckpt.latest() if cfg.checkpoint.autoresume else None
    # the initial weights; a LoRA checkpoint holds only the adapters, so its base comes from load_from again
    base_loaded = getattr(t.model, "base_loaded", False)  # QLoRA built its base from the weights
    if (latest is None or cfg.lora is not None) and cfg.checkpoint.load_from and not base_loaded:
        load_weights(cfg.checkpoint.load_from, t.model, world)
    if latest is not None:
        t.load_state_dict(t.ckpt.load(latest, t.model, t.optimizer))
        t.checkpoint = str(latest)
    if world.is_main:
        write_run_info(cfg, world.world_size, world.device)
    t.logger.start(t.step)
    if latest is not None:
        t.logger.print(f"resumed from {escape(str(latest))} at step {t.step} (world size {world.world_size})")
    return t


def build_trainer(cfg: RunConfig, world: World) -> Trainer:
    """What a training step needs, without data or checkpoints: the model with its fast paths (attention plan,
    precision, weight cast) applied, optimizer, schedule, guard and the step's shape. bench/bench_train.py times
    steps of exactly this."""
    seed_everything(cfg.seed + world.rank)
    tc = cfg.train
    micro = tc.micro_batch_size or tc.global_batch_size // world.world_size
    if micro < 1 or tc.global_batch_size % (world.world_size * micro):
        raise ConfigError(
            f"train.global_batch_size ({tc.global_batch_size}) must be a multiple of world size × micro_batch_size "
            f"({world.world_size} × {micro})"
        )
    on_cuda = world.device.type == "cuda"
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and on_cuda)
    seq = cfg.data.seq_len
    dtype = torch.bfloat16 if bf16 else torch.float32
    attention = select(cfg.model, "train", device=world.device, dtype=dtype, batch=micro, seq=seq)
    scoring = select(cfg.model, "score", device=world.device, dtype=dtype, batch=micro, seq=seq)
    # a LoRA base is frozen (stored in bf16 already): there are no trainable linears to cast once per step
    step_cast = uses_step_cast(tc.weight_cast, bf16=bf16, world_size=world.world_size) and cfg.lora is None
    options: dict[str, Any] = dict(
        plans={"train": attention, "score": scoring},
        head_loss=head_loss_for(tc.loss, micro * seq, cfg.model.vocab_size),
        step_cast=step_cast,
        activation_checkpointing=tc.activation_checkpointing,
        compile=tc.compile,
        bf16=bf16,
        reshard_after_forward=tc.reshard_after_forward,
        lora=cfg.lora,
    )
    if cfg.lora is not None and cfg.lora.base_dtype == "nf4":  # QLoRA: the base is quantized from its weights
        model = build_qlora_model(cfg.model, world, seed=cfg.seed, base=cfg.base_model, **options)
    else:
        model = build_model(cfg.model, world, seed=cfg.seed, **options)
    tokens_per_step = tc.global_batch_size * seq
    total = duration_steps(tc.max_duration, "train.max_duration", tokens_per_step=tokens_per_step)
    if total < 1:
        raise ConfigError(
            f"train.max_duration = {tc.max_duration!r} is less than one step ({tokens_per_step} tokens)"
        )
    every = {
        k: max(1, duration_steps(v, f"{k}", tokens_per_step=tokens_per_step))
        for k, v in (
            ("train.eval_interval", tc.eval_interval),
            ("checkpoint.interval", cfg.checkpoint.interval),
        )
    }
    return Trainer(
        cfg=cfg,
        world=world,
        model=model,
        optimizer=build_optimizer(model, cfg.optimizer),
        schedule=Schedule(cfg.scheduler, total_steps=total, tokens_per_step=tokens_per_step),
        micro=micro,
        accum=tc.global_batch_size // (world.world_size * micro),
        total_steps=total,
        eval_every=every["train.eval_interval"],
        save_every=every["checkpoint.interval"],
        tokens_per_step=tokens_per_step,
        guard=LossGuard(cfg.guard),
        autocast=torch.autocast(world.device.type, dtype=torch.bfloat16)
        if bf16 and world.world_size == 1
        else nullcontext(),
        flops_per_token=cfg.model.flops_per_token(seq)
        if cfg.lora is None
        else lora_flops_per_token(model, cfg.model.n_layers, cfg.model.d_model, seq),
        logger=RunLogger(cfg, enabled=world.is_main, total_steps=total),
        peak_tflops=tc.peak_tflops if tc.peak_tflops is not None else peak_tflops(world.device),
        weight_cast=StepWeightCast(model, torch.bfloat16) if step_cast else None,
        attention=attention,
    )


def check_paths(cfg: RunConfig) -> None:
    """Every place the run writes to is writable and every file it reads at the end exists, before the first step:
    an unwritable checkpoint folder or a missing tokenizer found at the first save or after the last step would
    cost the steps before it."""
    from pathlib import Path

    outputs = [("run_dir", cfg.run_dir), ("checkpoint.folder", cfg.checkpoint.folder)]
    if cfg.checkpoint.hf_export:
        outputs.append(("checkpoint.hf_export", cfg.checkpoint.hf_export))
    for key, folder in outputs:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".smalto-write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"{key} = {folder} cannot be written ({e.strerror or e}); point it at a writable folder"
            ) from None
    if cfg.tokenizer and not Path(cfg.tokenizer).exists():
        raise ConfigError(
            f"tokenizer = {cfg.tokenizer} does not exist (the HF export and the samples need it); "
            "fix the path or remove the key"
        )


def check_data(cfg: RunConfig) -> None:
    """Each data source's split has its index.json (read the way the stream reads it), checked before anything
    heavy is built."""
    from smalto.data.dataset import join, read_text
    from smalto.data.stream import _split_root
    from smalto.errors import DataError

    for i, src in enumerate(cfg.data.sources):
        index = join(_split_root(src), "index.json")
        try:
            found = read_text(index) is not None
        except OSError as e:
            raise DataError(f"data.sources[{i}].path = {src.path}: cannot read {index} ({e})") from None
        if not found:
            raise DataError(
                f"data.sources[{i}].path = {src.path} has no {index}: point it at a `smalto data` output folder "
                "(or an MDS split); `smalto data INPUT -o OUT -t TOKENIZER` makes one (docs/data.md)"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _val_loader(cfg: RunConfig, world: World, micro: int) -> Any:
    """The evaluation stream (each source's `eval_split`), or None when evaluation is off or there is no split."""
    from smalto.data.dataset import join, read_text
    from smalto.data.stream import build_loader

    if cfg.train.eval_batches == 0:
        return None
    split = cfg.train.eval_split
    missing = [s.path for s in cfg.data.sources if read_text(join(s.path, split, "index.json")) is None]
    if missing:
        if world.is_main:
            warnings.warn(
                f"no evaluation: {missing[0]} has no {split}/ split (set train.eval_batches=0 to silence)",
                stacklevel=2,
            )
        return None
    sources = [dataclasses.replace(s, split=split) for s in cfg.data.sources]
    vcfg = dataclasses.replace(cfg.data, sources=sources, shuffle=False, num_workers=0)
    return build_loader(
        vcfg,
        rank=world.rank,
        world_size=world.world_size,
        micro_batch_size=micro,
        global_batch_size=micro * world.world_size,
        epochs=1,
    )
