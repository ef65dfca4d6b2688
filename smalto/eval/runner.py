"""Run ICL tasks on a model: prepare prompts, split items across ranks, score, gather, judge.

    evaluate(model, tokenizer, tasks, ...)      -> EvalResults (per task, per category, gauntlet, samples)
    evaluate_icl(model, tokenizer, tasks, ...)  -> {"icl/<label>/<k>-shot": accuracy, "icl/gauntlet/...": ...}
                                                   what a training loop logs every N steps

Several ranks: when torch.distributed is initialized, rank r takes items r, r+W, r+2W, ... of every task and the
per-item records are gathered to every rank, so every rank returns the whole, identical result.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from smalto.errors import ConfigError
from smalto.eval import scorer
from smalto.eval.code_eval import run_code_task
from smalto.eval.gauntlet import score_gauntlet
from smalto.eval.prompts import Item, build_items, max_answer_tokens
from smalto.eval.sandbox import Limits
from smalto.eval.scoring import judge
from smalto.eval.tasks import (
    Suite,
    TaskConfig,
    read_items,
    resolve_data_root,
    resolve_tasks,
    strip_item,
)


@dataclass
class TaskResult:
    label: str
    num_fewshot: int
    icl_task_type: str
    accuracy: float
    n: int
    seconds: float
    categories: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # code evaluation: pass@k for every k

    @property
    def key(self) -> str:
        return f"{self.label}/{self.num_fewshot}-shot"


@dataclass
class EvalResults:
    tasks: list[TaskResult]
    gauntlet: dict[str, Any] | None
    seconds: float
    items: int
    skipped: list[dict[str, str]] = field(
        default_factory=list
    )  # {"task", "reason"}: could not run on this model

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        tasks = []
        for t in self.tasks:
            d = asdict(t)
            if not samples:
                d.pop("samples")
            tasks.append(d)
        return {
            "tasks": tasks,
            "gauntlet": self.gauntlet,
            "seconds": self.seconds,
            "items": self.items,
            "skipped": self.skipped,
        }

    def metrics(self, prefix: str = "icl/") -> dict[str, float]:
        out = {f"{prefix}{t.key}": t.accuracy for t in self.tasks}
        for t in self.tasks:
            out.update({f"{prefix}{t.key}/{c}": a for c, a in t.categories.items()})
        if self.gauntlet:
            out.update({f"{prefix}gauntlet/{k}": v for k, v in self.gauntlet["categories"].items()})
            out.update({f"{prefix}gauntlet/{k}": v for k, v in self.gauntlet["averages"].items()})
        return out


# ---------------------------------------------------------------- preparation (cached: training calls this often)

_PREPARED: dict[str, tuple[list[Item], int]] = {}


def prepare(
    task: TaskConfig, k: int, tokenizer: Any, max_seq_len: int, data_root: Any, limit: int | None
) -> tuple[list[Item], int]:
    """Items with their tokens, and the generation budget; memoized per tokenizer/task/shots/length/limit."""
    key = json.dumps([id(tokenizer), asdict(task), k, max_seq_len, str(data_root), limit], sort_keys=True)
    if key not in _PREPARED:
        as_read = read_items(task, data_root, strip=False)
        raw = [strip_item(it) for it in as_read] if task.strip_dataset else as_read
        # llm-foundry measures the generation budget on the answers as read, before stripping
        budget = (
            max_answer_tokens(task, as_read, tokenizer)
            if task.icl_task_type == "generation_task_with_answers"
            else 0
        )
        items = build_items(task, raw, k, tokenizer, max_seq_len, limit, answer_budget=budget or None)
        _PREPARED[key] = (items, budget)
    return _PREPARED[key]


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_sharded(model: Any) -> bool:
    """FSDP2/DTensor parameters: every forward is a collective, so all ranks must run the same number of them."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _equalize(n: int, world: int) -> int:
    """The largest batch count over ranks (sharded models pad with repeated batches up to it)."""
    if world == 1:
        return n
    t = torch.tensor([n], dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def run_task(
    model: Any,
    tokenizer: Any,
    task: TaskConfig,
    items: list[Item],
    *,
    budget: int,
    batch_size: int,
    max_seq_len: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Records of this rank's share of `items`, gathered from all ranks, in item order. `on_batch(done, total)`
    after each of this rank's batches."""
    rank, world = _rank_world()
    sharded = world > 1 and _is_sharded(model)
    mine = items[rank::world]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bs = task.batch_size or batch_size
    records: list[dict[str, Any]] = []
    if task.icl_task_type == "generation_task_with_answers":
        order = sorted(range(len(mine)), key=lambda i: -len(mine[i].gen_context or []))
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        outputs: dict[int, str] = {}
        for b in range(_equalize(len(batches), world) if sharded else len(batches)):
            real = b < len(batches)
            idx = batches[b] if real else batches[-1] if batches else []
            ctxs = [mine[i].gen_context or [pad_id] for i in idx] or [[pad_id]]
            texts = scorer.generate_greedy(
                model,
                tokenizer,
                ctxs,
                max_new_tokens=max(budget, 1),
                stop=task.early_stopping_criteria,
                pad_id=pad_id,
                fixed_steps=sharded,
            )
            if real:
                outputs.update(zip(idx, texts, strict=True))
            if on_batch is not None:
                on_batch(b + 1, len(batches))
        records = [judge(task, it, None, outputs[i]) for i, it in enumerate(mine)]
    else:
        flat = [(i, j) for i, it in enumerate(mine) for j in range(len(it.requests))]
        reqs = [mine[i].requests[j] for i, j in flat]
        batches = scorer.plan_batches(reqs, bs) if reqs else []
        scores: dict[int, Any] = {}
        for b in range(_equalize(len(batches), world) if sharded else len(batches)):
            real = b < len(batches)
            idx = batches[b] if real else batches[-1] if batches else []
            got = scorer.score_batch(model, [reqs[i] for i in idx], pad_id, max_seq_len) if idx else []
            if real:
                scores.update(zip(idx, got, strict=True))
            if on_batch is not None:
                on_batch(b + 1, len(batches))
        per_item: list[list[Any]] = [[] for _ in mine]
        for r, (i, _) in enumerate(flat):
            per_item[i].append(scores[r])
        records = [judge(task, it, per_item[i], None) for i, it in enumerate(mine)]
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return sorted(records, key=lambda r: r["index"])


def _accuracy(records: list[dict[str, Any]]) -> float:
    """Mean of the verdicts (code evaluation: of the per-problem pass@k)."""
    return sum(float(r["correct"]) for r in records) / max(len(records), 1)


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def too_long(task: TaskConfig, budget: int, seq_len: int) -> str | None:
    """Why a generation task cannot run within the model's context (llm-foundry refuses such a task)."""
    if task.icl_task_type == "generation_task_with_answers" and budget >= seq_len:
        return (
            f"it generates up to {budget} tokens (its longest answer{' + chain of thought' if task.cot_delimiter else ''}) "
            f"and the model's context is {seq_len} tokens, leaving no room for the prompt"
        )
    return None


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Suite | list[str] | str,
    *,
    data_root: str | Path | None = None,
    fewshot: list[int] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_seq_len: int | None = None,
    log_samples: bool = False,
    on_task: Callable[[TaskResult], None] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_batch: Callable[[str, int, int], None] | None = None,
    code_limits: Limits | None = None,
    code_workers: int | None = None,
) -> EvalResults:
    """Every task × few-shot setting of `tasks` (a Suite, or `--tasks` specs). `fewshot` replaces each task's
    num_fewshot list. The model is put in eval mode and given back in the mode it came in.

    A task that cannot run here (its generation budget leaves no room in the model's context; code in a language
    without its compiler) is skipped: listed in `skipped`, reported through `on_skip(key, reason)` (default: a
    warning). `on_batch(key, done, total)` reports progress within a task. Code runs in the sandbox under `code_limits` (default: llm-foundry's 5 s per test case),
    `code_workers` runs at a time (default: the CPU count)."""
    suite = tasks if isinstance(tasks, Suite) else resolve_tasks(tasks)
    root = resolve_data_root(data_root)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    model_len = scorer.model_max_len(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    results: list[TaskResult] = []
    skipped: list[dict[str, str]] = []
    try:
        for task in suite.tasks:
            seq_len = min(max_seq_len or task.max_seq_len or model_len, model_len)
            for k in fewshot if fewshot is not None else task.num_fewshot:
                t1 = time.perf_counter()
                key = f"{task.label}/{k}-shot"
                records: list[dict[str, Any]] = []
                why: str | None = None
                rank, world = _rank_world()
                if task.icl_task_type == "code_evaluation" and world > 1 and _is_sharded(model):
                    why = "code evaluation samples on every rank alone: not with sharded (FSDP) models"
                elif task.icl_task_type == "code_evaluation":
                    records, why = run_code_task(
                        model,
                        tokenizer,
                        task,
                        k,
                        seq_len,
                        root,
                        limit,
                        limits=code_limits or Limits(),
                        workers=code_workers or os.cpu_count() or 1,
                        batch_size=max(1, (task.batch_size or batch_size) // task.generations_per_sample),
                        rank=rank,
                        world=world,
                    )
                else:
                    items, budget = prepare(task, k, tokenizer, seq_len, root, limit)
                    why = too_long(task, budget, seq_len)
                    if why is None:
                        records = run_task(
                            model,
                            tokenizer,
                            task,
                            items,
                            budget=budget,
                            batch_size=batch_size,
                            max_seq_len=seq_len,
                            on_batch=None if on_batch is None else functools.partial(on_batch, key),
                        )
                if why is not None:
                    skipped.append({"task": key, "reason": why})
                    if on_skip is not None:
                        on_skip(key, why)
                    else:
                        warnings.warn(f"{key} skipped: {why}", stacklevel=2)
                    continue
                cats: dict[str, list[dict[str, Any]]] = {}
                for r in records:
                    if "category" in r:
                        cats.setdefault(r["category"], []).append(r)
                if log_samples and task.icl_task_type != "code_evaluation":  # code records carry their prompt
                    for r in records:
                        r["prompt"] = items[r["index"]].prompt
                        r["options"] = items[r["index"]].options
                res = TaskResult(
                    label=task.label,
                    num_fewshot=k,
                    icl_task_type=task.icl_task_type,
                    # with categories llm-foundry's task average is the mean of the category accuracies
                    accuracy=(
                        sum(_accuracy(rs) for rs in cats.values()) / len(cats) if cats else _accuracy(records)
                    ),
                    n=len(records),
                    seconds=time.perf_counter() - t1,
                    categories={c: _accuracy(rs) for c, rs in sorted(cats.items())},
                    samples=records if log_samples else [],
                    metrics={
                        f"pass@{n}": _mean([r[f"pass@{n}"] for r in records]) for n in task.pass_at_k_list
                    }
                    if task.icl_task_type == "code_evaluation"
                    else {},
                )
                results.append(res)
                if on_task is not None:
                    on_task(res)
    finally:
        model.train(was_training)
    gauntlet = score_gauntlet(suite.gauntlet, results) if suite.gauntlet else None
    return EvalResults(
        tasks=results,
        gauntlet=gauntlet,
        seconds=time.perf_counter() - t0,
        items=sum(r.n for r in results),
        skipped=skipped,
    )


def evaluate_icl(
    model: Any, tokenizer: Any, tasks: Suite | list[str] | str, **kwargs: Any
) -> dict[str, float]:
    """ICL accuracies (and gauntlet scores) as flat metrics for a training loop's metrics stream.

    Same arguments as `evaluate`; prompts are tokenized once and reused on later calls. Call it on every rank
    (items are split across ranks; sharded models are supported), under no autocast of your own.
    """
    return evaluate(model, tokenizer, tasks, **kwargs).metrics()
