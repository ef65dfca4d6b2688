"""The training loop: `train(cfg)` runs a recipe on one process or under torchrun.

A step takes the rank's G/(world·micro) micro-batches, sums each one's token cross-entropy divided by the
step's global count of predicted tokens (so the gradient is that of the mean over all tokens of all ranks,
however they are split), clips the global gradient norm, asks the loss guard, and updates. The loss and the
grad norm reach the host once per step (one sync; the guard needs them before the update).
The loop state is a few numbers (`step`, `tokens`, `seconds`); the last step always evaluates and saves.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from rich.markup import escape
from torch.distributed.fsdp import FSDPModule

from smalto.config import RunConfig, parse_seconds
from smalto.errors import UserError
from smalto.kernels import cudnn_attention
from smalto.kernels.chunked_loss import chunked_head_loss
from smalto.kernels.loss import head_loss_for
from smalto.train.checkpoint import export_hf
from smalto.train.guard import OK, STOP
from smalto.train.metrics import memory_gib, mfu
from smalto.train.parallel import World, close_world, init_world
from smalto.train.setup import Trainer, setup


@dataclass
class TrainResult:
    steps: int
    tokens: int
    loss: float | None
    eval_loss: float | None
    stopped: str | None  # None (finished), "SIGTERM"/"SIGINT", or "guard: <reason>"
    checkpoint: str | None
    hf_folder: str | None
    samples: list[str] = field(default_factory=list)
    eval_before: float | None = None  # the held-out loss before the first step (train.eval_first)
    losses: list[float] = field(
        default_factory=list
    )  # this launch's, the last 100 at most (all: metrics.jsonl)


class Objective(Protocol):
    """What an objective other than next-token loss gives the loop (DPO: smalto/train/dpo.py): its data streams,
    what it prepares once the trainer is built (a reference model), its step and its evaluation."""

    def loaders(self, cfg: RunConfig, world: World) -> tuple[Any, Any]: ...

    def start(self, t: Trainer) -> None: ...

    def step(
        self, t: Trainer, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, Any], str]: ...

    def evaluate(self, t: Trainer) -> dict[str, float]: ...


def train(
    cfg: RunConfig,
    on_eval: Callable[[Trainer, dict[str, Any]], None] | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Run the recipe. `on_eval(t, metrics)` runs after each evaluation, before the metrics are logged (the
    finetuning objective adds sample generations there); `objective` replaces the next-token step, evaluation and
    data streams (None: pretraining and finetuning)."""
    world = init_world(cfg.train.device)
    step_fn = objective.step if objective is not None else train_step
    evaluate_fn = objective.evaluate if objective is not None else evaluate
    try:
        t = setup(cfg, world, loaders=objective.loaders if objective is not None else None)
        if objective is not None:
            objective.start(t)
        if cfg.train.eval_first and t.step == 0 and t.val_loader is not None:
            first = evaluate_fn(t)
            t.first_eval = first["eval/loss"]
            if on_eval is not None:
                on_eval(t, first)
            t.logger.log(0, first)
        batches = iter(t.loader)
        stopped: str | None = None
        end = (
            t.total_steps
            if cfg.train.stop_after is None
            else min(t.total_steps, t.step + cfg.train.stop_after)
        )
        limit = parse_seconds(cfg.train.time_limit, "train.time_limit") if cfg.train.time_limit else math.inf
        with StopSignals() as signals:
            while t.step < end:
                metrics, verdict = step_fn(t, [next(batches) for _ in range(t.accum)])
                if verdict == STOP:
                    stopped = f"guard: {t.guard.reason}"
                    break
                t.step += 1
                last = t.step == t.total_steps or t.out_of_time(limit)
                stopped = signals.requested(world) or ("stop_after" if t.step == end and not last else None)
                if t.val_loader is not None and (last or t.step % t.eval_every == 0):
                    metrics.update(evaluate_fn(t))
                    if on_eval is not None:
                        on_eval(t, metrics)
                t.logger.log(t.step, metrics)
                if last or stopped or t.step % t.save_every == 0:
                    t.checkpoint = save(t)
                if stopped or last:
                    break
        return finish(t, stopped)
    finally:
        close_world(world)


def save(t: Trainer) -> str:
    """A checkpoint of the step just taken, timed: on SIGTERM it must fit the launcher's grace (docs/train.md)."""
    start = time.perf_counter()
    path = t.ckpt.save(t.step, t.model, t.optimizer, t.state_dict())
    t.logger.print(f"saved {path.name} in {time.perf_counter() - start:.1f} s")
    return str(path)


def out_of_memory_advice(cfg: RunConfig, micro: int, *, in_optimizer: bool = False) -> str:
    """What to change after running out of memory: the micro-batch while it can shrink, else the other levers. In
    the optimizer step (`in_optimizer`: its state is allocated at the first step) only the state's levers help."""
    tc, oc = cfg.train, cfg.optimizer
    if in_optimizer:
        levers = []
        if oc.offload == "none":
            levers.append("optimizer.offload=cpu (one process: the optimizer state in CPU memory)")
        if oc.name == "adamw" and oc.state_dtype == "fp32":
            levers.append("optimizer.state_dtype=bf16 (AdamW's moments in half the memory)")
        if oc.name == "adamw":
            levers.append("optimizer.name=lion (one moment instead of two)")
        levers.append("more GPUs under torchrun (FSDP2 shards the optimizer state)")
        return "out of memory in the optimizer step (allocating its state); try " + "; ".join(levers)
    if micro > 1:
        return (
            f"out of memory with train.micro_batch_size = {micro}; lower it (e.g. train.micro_batch_size="
            f"{max(1, micro // 2)}): gradient accumulation keeps the global batch"
            + ("" if tc.activation_checkpointing else ", or turn on train.activation_checkpointing")
        )
    levers = [f"a shorter sequence (data.seq_len = {cfg.data.seq_len})"]
    if tc.activation_checkpointing is not True:
        levers.append("train.activation_checkpointing=true (every block)")
    if head_loss_for(tc.loss, cfg.data.seq_len, cfg.model.vocab_size) is not chunked_head_loss:
        levers.append("train.loss=chunked (no full logits)")
    if tc.weight_cast == "step":
        levers.append("train.weight_cast=micro_batch (no bf16 copy of the weights held for the step)")
    if oc.offload == "none":
        levers.append("optimizer.offload=cpu (one process: the optimizer state in CPU memory)")
    levers.append("more GPUs under torchrun (FSDP2 shards parameters, gradients and optimizer state)")
    return "out of memory with train.micro_batch_size already 1; try " + "; ".join(levers)


def train_step(t: Trainer, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, Any], str]:
    """One optimizer step over this rank's micro-batches; returns its metrics and the guard's verdict."""
    start = time.perf_counter()
    dev, ws = t.world.device, t.world.world_size
    n_global = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
    n_global_t = torch.tensor(float(n_global), device=dev)
    if ws > 1:
        dist.all_reduce(n_global_t)
    loss_sum = torch.zeros((), device=dev)
    staged = stage(micro_batches, dev)
    # train.grad_sync: step: FSDP2 keeps unsharded gradients until the last micro-batch reduce-scatters them
    sync_at_last = t.model if isinstance(t.model, FSDPModule) and t.cfg.train.grad_sync == "step" else None
    try:
        with t.weight_cast or nullcontext():  # bf16 weights for the whole step (weight_cast.py)
            for i, (ids, labels, seq_id) in enumerate(staged):
                if sync_at_last is not None:
                    sync_at_last.set_requires_gradient_sync(i == len(staged) - 1)
                with t.autocast:
                    mean = t.model(ids, sequence_id=seq_id, labels=labels, return_logits=False).loss
                n = (labels[:, 1:] != -100).sum()
                loss = torch.where(n > 0, mean * n, 0.0) / n_global_t  # this micro-batch's share
                (loss * ws).backward()  # FSDP averages gradients over ranks; we want their sum
                loss_sum += loss.detach()
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory_advice(t.cfg, t.micro)) from None
    if ws > 1:
        dist.all_reduce(loss_sum)
    # tokens that are not padding (sequence_id -1), rank 0's count times the world size
    real = sum(int((mb["sequence_id"] >= 0).sum()) for mb in micro_batches) * ws
    return update(t, loss_sum, start, real_tokens=real)


def update(
    t: Trainer, loss_sum: torch.Tensor, start: float, *, real_tokens: int, extra: torch.Tensor | None = None
) -> tuple[dict[str, Any], str]:
    """The end of every objective's step, once the backward passes are done: clip the global gradient norm, ask
    the guard, update, and count. `loss_sum` is the step's global loss; `extra` (optional, on the device) reaches
    the host in the same sync, as `metrics["extra"]`."""
    dev, ws = t.world.device, t.world.world_size
    params = [p for p in t.model.parameters() if p.grad is not None]
    clip = t.cfg.train.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    head = torch.stack([loss_sum.float(), norm.float().to(dev)])
    synced = (
        head if extra is None else torch.cat([head, extra.float().flatten()])
    ).tolist()  # the one host sync
    loss_v, norm_v = synced[:2]
    verdict = t.guard.check(t.step, loss_v)
    lr = t.schedule.apply(t.optimizer, t.step, t.cfg.optimizer.lr)
    if verdict == OK:
        try:
            t.optimizer.step()
        except torch.OutOfMemoryError:
            raise UserError(out_of_memory_advice(t.cfg, t.micro, in_optimizer=True)) from None
    t.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    t.seconds += seconds
    t.launch_seconds += seconds
    t.tokens += t.tokens_per_step
    t.losses.append(loss_v)
    t.last_loss = loss_v
    if t.first_loss is None:
        t.first_loss = loss_v
    tps = t.tokens_per_step / seconds
    metrics: dict[str, Any] = {
        "throughput/real_tokens_per_s": real_tokens / seconds,
        "train/loss": loss_v,
        "train/grad_norm": norm_v,
        "train/lr": lr,
        "train/tokens": t.tokens,
        "throughput/tokens_per_s": tps,
        "throughput/mfu": mfu(tps, t.flops_per_token, ws, t.peak_tflops),
        "memory/peak_gib": memory_gib(dev),
        "time/step_s": seconds,
    }
    if extra is not None:
        metrics["extra"] = synced[2:]
    if verdict != OK:
        metrics["guard"] = verdict
        t.logger.print(f"[yellow]loss guard: {verdict} at step {t.step}: {escape(t.guard.reason or '')}")
    return metrics, verdict


def stage(micro_batches: list[dict[str, torch.Tensor]], dev: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """The step's micro-batches on the device, as (input_ids, labels, sequence_id): on CUDA one copy per
    micro-batch from pinned memory, all issued before the first forward, so that no pageable copy waits on the
    stream between micro-batches."""
    keys = ("input_ids", "labels", "sequence_id")
    if dev.type != "cuda":
        return [tuple(mb[k].to(dev) for k in keys) for mb in micro_batches]
    staged = []
    for mb in micro_batches:
        on_dev = torch.stack([mb[k] for k in keys]).pin_memory().to(dev, non_blocking=True)
        staged.append(tuple(on_dev.unbind(0)))
    return staged


@torch.no_grad()
def evaluate(t: Trainer) -> dict[str, float]:
    """Mean next-token loss over `eval_batches` validation micro-batches per rank, and its perplexity."""
    t.model.eval()
    dev = t.world.device
    total = torch.zeros(2, device=dev, dtype=torch.float64)
    t.val_loader.consumed = 0  # the same validation samples every time
    for i, mb in enumerate(t.val_loader):
        if i >= t.cfg.train.eval_batches:
            break
        labels = mb["labels"].to(dev)
        with t.autocast:
            ids, seq_id = mb["input_ids"].to(dev), mb["sequence_id"].to(dev)
            mean = t.model(ids, sequence_id=seq_id, labels=labels, return_logits=False).loss
        n = (labels[:, 1:] != -100).sum()
        total += torch.stack([torch.where(n > 0, mean.double() * n, 0.0), n.double()])
    if t.world.world_size > 1:
        dist.all_reduce(total)
    t.model.train()
    loss = float(total[0] / total[1].clamp(min=1))
    t.last_eval = loss
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def finish(t: Trainer, stopped: str | None) -> TrainResult:
    cfg, world = t.cfg, t.world
    hf_folder, samples = None, []
    if stopped and stopped.startswith("guard"):
        t.checkpoint = _guard_checkpoint(t)
    t.logger.close()
    if stopped is None and cfg.checkpoint.hf_export and cfg.lora is not None:
        from smalto.train.adapters import export_adapter

        export_adapter(t.model, cfg.checkpoint.hf_export, world, cfg)  # PEFT's adapter folder, not a model
        hf_folder = cfg.checkpoint.hf_export
    elif stopped is None and cfg.checkpoint.hf_export:
        plain = export_hf(t.model, cfg.checkpoint.hf_export, world, tokenizer=cfg.tokenizer)
        hf_folder = cfg.checkpoint.hf_export
        if plain is not None and cfg.train.sample_prompts and cfg.tokenizer:
            from smalto.generate import generate
            from smalto.tokenizer import load_tokenizer

            prompts = cfg.train.sample_prompts
            done = generate(
                plain.to(world.device),
                load_tokenizer(cfg.tokenizer),
                prompts,
                max_new_tokens=cfg.train.sample_tokens,
                temperature=0.8,
                top_k=50,
                seed=cfg.seed,
            )
            samples = [p + (c.text or "") for p, c in zip(prompts, done, strict=True)]
    result = TrainResult(
        steps=t.step,
        tokens=t.tokens,
        loss=t.last_loss,
        eval_loss=t.last_eval,
        eval_before=t.first_eval,
        stopped=stopped,
        checkpoint=t.checkpoint,
        hf_folder=hf_folder,
        samples=samples,
        losses=list(t.losses),
    )
    t.logger.summary(_summary_rows(t, result))
    return result


def _guard_checkpoint(t: Trainer) -> str | None:
    """After a guard stop: the newest checkpoint from before the spike becomes `latest`."""
    start = t.guard.streak_start if t.guard.streak_start is not None else t.step
    if (
        start >= t.step
    ):  # nothing was applied at or after the bad step: the current weights are from before it
        return str(t.ckpt.save(t.step, t.model, t.optimizer, t.state_dict()))
    before = [p for p in t.ckpt.saved() if int(p.name.split("_")[1]) <= start]
    if before:
        t.ckpt.point_latest(before[-1])
        return str(before[-1])
    t.logger.print(
        f"[red]no checkpoint from before step {start} exists; save more often (checkpoint.interval)"
    )
    return None


def _summary_rows(t: Trainer, r: TrainResult) -> dict[str, str]:
    rows = {
        "steps": f"{r.steps} / {t.total_steps}",
        "tokens": f"{r.tokens:,}",
        "final train loss": f"{r.loss:.4f}" if r.loss is not None else "-",
        "first train loss": f"{t.first_loss:.4f}" if t.first_loss is not None else "-",
        "validation loss": f"{r.eval_loss:.4f} (ppl {math.exp(min(r.eval_loss, 50)):.2f})"
        if r.eval_loss
        else "-",
        "time training": f"{t.seconds:.1f} s",
        "tokens/s": f"{r.tokens / max(t.seconds, 1e-9):,.0f}",
        "world size": str(t.world.world_size),
        "attention": _attention_note(t),
        "checkpoint": r.checkpoint or "-",
        "HF folder": r.hf_folder or "-",
    }
    if t.guard.skipped:
        rows["skipped batches"] = str(t.guard.skipped)
    if r.stopped:
        rows["stopped"] = r.stopped
    return rows


def _attention_note(t: Trainer) -> str:
    """The attention kernel training ran, with the hint when the faster cuDNN kernel was only missing its package."""
    name = t.attention.name
    if name == "flex" and t.world.device.type == "cuda" and not cudnn_attention.available():
        return 'flex (cuDNN\'s faster ALiBi kernel: pip install "smalto[cudnn]")'
    return name


class StopSignals:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step (all ranks agree)."""

    def __init__(self) -> None:
        self.received: str | None = None

    def __enter__(self) -> StopSignals:
        self.old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def requested(self, world: World) -> str | None:
        if world.world_size > 1:  # a rank that stops alone would hang the others in the next collective
            flag = torch.tensor(
                [0 if self.received is None else 1 if self.received == "SIGINT" else 2], device=world.device
            )
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return [None, "SIGINT", "SIGTERM"][int(flag)]
        return self.received

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
