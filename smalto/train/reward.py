"""The reward model's objective: Bradley–Terry on preference pairs (TRL's RewardTrainer), and its held-out accuracy.

    bradley_terry_loss(r_chosen, r_rejected, margin)  mean of -log σ(r_chosen - r_rejected - margin)
    pair_batch(pairs, pad_id)                          chosen rows then rejected rows, right-padded: (2B, T) ids
    train_reward(model, pairs, held_out, section, ...) the optimizer steps (resumed from a checkpoint when there
                                                       is one); returns the last evaluation and why it stopped early
A row is scored at its last non-pad token (smalto.model.heads.last_token_index). Rows are right-padded, so causal
attention alone keeps padding out of every real token's state: no attention mask is needed, and any training
kernel (cuDNN's plain causal one too) computes the forward.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from smalto.config import OptimizerConfig, SchedulerConfig
from smalto.data.pairs import PreferencePair
from smalto.errors import ConfigError
from smalto.model.heads import MPTForSequenceScore

if TYPE_CHECKING:
    from smalto.train.resume import RunCheckpoints

PAD_MULTIPLE = 64  # rows are padded to a multiple of this: few distinct shapes for compiled kernels


@dataclass(kw_only=True)
class RewardSection:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Pairs per step (each pair is two rows)."""
    micro_batch_size: int | None = None
    """Pairs per forward (gradient accumulation up to batch_size); default all of them."""
    margin: float = 0.0
    """Subtracted from r_chosen - r_rejected inside the loss (TRL's `margin` column, as one number)."""
    center_rewards_coefficient: float | None = None
    """TRL's: adds coefficient · mean((r_chosen + r_rejected)²), keeping rewards near zero."""
    max_length: int = 512
    """Prompt + completion tokens; longer pairs are dropped and counted."""
    eval_fraction: float = 0.1
    """Pairs held out for accuracy (when no eval_path is given)."""
    eval_every: int = 50
    grad_clip: float | None = 1.0
    stop_after: int | None = None
    """End this launch (with a checkpoint) after this many steps; relaunching the command continues the run."""

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(
                f"reward.stop_after = {self.stop_after} must be a positive number of steps or null"
            )
        for key in ("steps", "batch_size", "max_length", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"reward.{key} = {getattr(self, key)} must be ≥ 1")
        if self.micro_batch_size is not None and (
            self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size
        ):
            raise ConfigError(
                f"reward.micro_batch_size = {self.micro_batch_size} must be ≥ 1 and divide reward.batch_size "
                f"({self.batch_size})"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"reward.eval_fraction = {self.eval_fraction} must be in [0, 1)")


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0, center: float | None = None
) -> Tensor:
    """TRL RewardTrainer's loss: -logsigmoid(r_chosen - r_rejected - margin), averaged over pairs, plus
    center · mean((r_chosen + r_rejected)²) when `center` is given."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center is not None:
        loss = loss + center * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def pair_batch(pairs: list[PreferencePair], pad_id: int, multiple: int = PAD_MULTIPLE) -> Tensor:
    """(2B, T) token ids: the B chosen sequences (prompt + chosen), then the B rejected ones, right-padded."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    T = max(len(r) for r in rows)
    T = -(-T // multiple) * multiple
    out = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


@torch.no_grad()
def accuracy(
    model: MPTForSequenceScore, pairs: list[PreferencePair], batch: int, autocast: Any
) -> dict[str, float]:
    """The fraction of pairs whose chosen completion scores above the rejected one (ties count half), and the
    mean margin r_chosen - r_rejected."""
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    wins, margin = 0.0, 0.0
    for i in range(0, len(pairs), batch):
        part = pairs[i : i + batch]
        r = score_pairs(model, part, autocast)
        d = r[: len(part)] - r[len(part) :]
        wins += float((d > 0).sum() + 0.5 * (d == 0).sum())
        margin += float(d.sum())
    model.train(was_training)
    return {"eval/accuracy": wins / len(pairs), "eval/margin": margin / len(pairs)}


def score_pairs(model: MPTForSequenceScore, pairs: list[PreferencePair], autocast: Any) -> Tensor:
    assert model.pad_token_id is not None  # the reward runner sets one
    ids = pair_batch(pairs, model.pad_token_id).to(model.device)
    with autocast:
        return model(ids)


def train_reward(
    model: MPTForSequenceScore,
    train: list[PreferencePair],
    held: list[PreferencePair],
    section: RewardSection,
    optim: OptimizerConfig,
    sched: SchedulerConfig,
    *,
    seed: int,
    log: Callable[[int, dict[str, Any]], None],
    checkpoints: RunCheckpoints | None = None,
) -> tuple[dict[str, float], str | None]:
    """Run `section.steps` optimizer steps over shuffled epochs of `train`; evaluate on `held` first, every
    `eval_every` steps and at the end; `log(step, metrics)` sees every step. With `checkpoints`, continue from the
    latest checkpoint, save every interval, at the last step and when stopped (SIGINT / SIGTERM / stop_after).
    Returns (the last evaluation, why this launch stopped early or None)."""
    from smalto.train.optim import Schedule, build_optimizer

    if len(train) < section.batch_size:
        raise ConfigError(
            f"reward.batch_size ({section.batch_size}) is larger than the {len(train)} training pairs; lower it"
        )
    dev = model.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    optimizer = build_optimizer(model, optim)
    schedule = Schedule(sched, total_steps=section.steps, tokens_per_step=1)
    micro = section.micro_batch_size or section.batch_size
    state = checkpoints.resume(model, optimizer) if checkpoints is not None else None
    start = 0 if state is None else min(state["step"], section.steps)
    order = _epochs(len(train), seed)
    for _ in range(start * section.batch_size):  # the pairs the checkpoint's steps drew
        next(order)
    if start == 0:
        last = accuracy(model, held, micro, autocast)
        log(0, last)
    elif start == section.steps:  # a finished run relaunched: nothing to train (metrics.jsonl has its steps)
        return accuracy(model, held, micro, autocast), None
    else:
        last = {}
    end = section.steps if section.stop_after is None else min(section.steps, start + section.stop_after)
    stopped: str | None = None
    model.train()
    with checkpoints.signals if checkpoints is not None else nullcontext():
        for step in range(start, end):
            began = time.perf_counter()
            picked = [train[next(order)] for _ in range(section.batch_size)]
            loss, wins = _forward_backward(model, picked, section, micro, autocast)
            clip = section.grad_clip if section.grad_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            lr = schedule.apply(optimizer, step, optim.lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_v, acc_v, norm_v = torch.stack([loss, wins / len(picked), norm.float()]).tolist()
            metrics: dict[str, Any] = {
                "train/loss": loss_v,
                "train/accuracy": acc_v,
                "train/grad_norm": norm_v,
                "train/lr": lr,
                "time/step_s": time.perf_counter() - began,
            }
            done = step + 1
            if held and (done % section.eval_every == 0 or done == section.steps):
                last = accuracy(model, held, micro, autocast)
                metrics.update(last)
            log(done, metrics)
            if checkpoints is not None:
                stopped = checkpoints.end_of_step(done, section.steps, end, model, optimizer, {})
                if stopped:
                    break
    return last, stopped


def _forward_backward(
    model: MPTForSequenceScore,
    picked: list[PreferencePair],
    section: RewardSection,
    micro: int,
    autocast: Any,
) -> tuple[Tensor, Tensor]:
    """The forwards and backwards of one step's pairs (gradients accumulated over micro-batches): its mean loss
    and the number of pairs whose chosen row scored higher, on the device."""
    dev = model.device
    total = torch.zeros((), device=dev)
    wins = torch.zeros((), device=dev)
    for i in range(0, len(picked), micro):
        part = picked[i : i + micro]
        r = score_pairs(model, part, autocast)
        rc, rr = r[: len(part)], r[len(part) :]
        loss = bradley_terry_loss(rc, rr, section.margin, section.center_rewards_coefficient)
        (loss * len(part) / len(picked)).backward()
        total += loss.detach() * len(part) / len(picked)
        wins += (rc > rr).float().sum().detach()
    return total, wins


def _epochs(n: int, seed: int) -> Any:
    """Indices 0..n-1 in a new seeded order every epoch, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order
