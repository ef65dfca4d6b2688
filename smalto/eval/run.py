"""`smalto eval`: load a model, run ICL tasks and/or perplexity, print and write the report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from smalto.errors import ConfigError


@dataclass(kw_only=True)
class EvalConfig:
    model: str
    tasks: list[str] = field(default_factory=list)
    fewshot: list[int] | None = None
    limit: int | None = None
    batch_size: int = 16
    max_seq_len: int | None = None
    data_root: str | None = None
    out: str | None = None
    log_samples: bool = False
    perplexity: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: Any = None  # a smalto.quant.QuantSpec: --quantize (smalto MPT folders)
    adapter: str | None = None  # a PEFT LoRA adapter folder on top of the model (smalto's model types)
    ppl_by_position: str | None = None  # text / JSONL / token shards: perplexity per position bucket
    length: int | None = None  # --ppl-by-position's window (default: twice the trained length, ALiBi / RoPE)
    buckets: int | None = None  # --ppl-by-position's position buckets (default 8)

    def __post_init__(self) -> None:
        for flag, value in (
            ("--limit", self.limit),
            ("--max-seq-len", self.max_seq_len),
            ("--batch-size", self.batch_size),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: give a whole number >= 1 (leave it out for the default)")
        for flag, value in (("--length", self.length), ("--buckets", self.buckets)):
            if value is not None and not self.ppl_by_position:
                raise ConfigError(f"{flag} applies to --ppl-by-position DATA; add it or drop {flag}")
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: give a whole number >= 1 (leave it out for the default)")
        from smalto.hf.load import parse_dtype

        try:
            parse_dtype(self.dtype)
        except ConfigError as e:
            raise ConfigError(f"--dtype: {e}") from None


def parse_fewshot(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--fewshot {text!r}: write shot counts separated by commas, e.g. 0,5") from None
    if not shots or min(shots) < 0:
        raise ConfigError(f"--fewshot {text!r}: give non-negative shot counts, e.g. 0,5")
    return shots


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Everything `smalto eval` does; returns the results dict written to OUT/results.json."""
    from smalto.eval.models import resolve_device
    from smalto.eval.tasks import resolve_data_root, resolve_tasks

    if not cfg.tasks and not cfg.perplexity and not cfg.ppl_by_position:
        raise ConfigError(
            "nothing to evaluate: pass --tasks (a task YAML, gauntlet, all, or task labels), --perplexity DATA "
            "and/or --ppl-by-position DATA"
        )
    # check everything a user can get wrong before loading weights
    suite = resolve_tasks(cfg.tasks) if cfg.tasks else None
    root = resolve_data_root(cfg.data_root) if suite else None
    if cfg.perplexity:
        from smalto.eval.perplexity import find_split

        find_split(cfg.perplexity)
    window = None
    if cfg.ppl_by_position:
        from smalto.eval.by_position import check_data, window_length

        check_data(cfg.ppl_by_position)
        # from the config alone: a learned-position model is refused past its table before any weights load
        window = window_length(cfg.model, cfg.length)
        if cfg.buckets is not None and cfg.buckets > window[0] // 2:
            raise ConfigError(
                f"--buckets {cfg.buckets}: give between 1 and {window[0] // 2} (half of --length {window[0]}) buckets"
            )
    if cfg.out:
        _check_out(cfg.out)
    resolve_device(cfg.device)
    device = _rank_device(cfg.device)  # before the process group: NCCL binds each rank to its own GPU
    dist, owned = _init_distributed()
    try:
        return _evaluate(cfg, suite, root, device, dist, window)
    finally:
        if owned:  # this run created the group (under torchrun): close it; a caller's group stays
            import torch

            torch.distributed.destroy_process_group()


def _evaluate(
    cfg: EvalConfig,
    suite: Any,
    root: Any,
    device: str,
    dist: bool,
    window: tuple[int, int, int | None] | None,
) -> dict[str, Any]:
    """`window`: (length, trained length, max_seq_len to load with) of --ppl-by-position."""
    from smalto.eval.models import load_model
    from smalto.eval.report import print_results, write_partial_results, write_results

    model, tokenizer = load_model(
        cfg.model,
        tokenizer=cfg.tokenizer,
        device=device,
        dtype=cfg.dtype,
        quantize=cfg.quantize,
        adapter=cfg.adapter,
        max_seq_len=window[2] if window else None,
    )
    results: dict[str, Any] = {"model": cfg.model, "tasks": [], "gauntlet": None, "perplexity": None}
    samples: dict[str, list[dict[str, Any]]] = {}
    rank0 = not dist or _rank() == 0
    if suite is not None:
        from rich.console import Console
        from rich.markup import escape

        from smalto.eval.runner import evaluate

        console = Console(stderr=True)
        bar = _batch_bar(console, rank0)
        done: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []

        def write_partial() -> None:  # results so far, so a long run that stops leaves what it finished
            if rank0 and cfg.out:
                write_partial_results(
                    cfg.out, {**results, "tasks": done, "skipped": skipped, "complete": False}
                )

        def progress(t: Any) -> None:
            if rank0:
                extra = "".join(f", {k} {v:.4f}" for k, v in t.metrics.items())
                console.print(
                    f"{t.key}: accuracy {t.accuracy:.4f}{extra} over {t.n} items in {t.seconds:.1f}s"
                )
            d = dict(vars(t))
            d.pop("samples")
            done.append(d)
            write_partial()

        def skip(key: str, why: str) -> None:
            if rank0:
                console.print(f"[yellow]{escape(key)} skipped:[/] {escape(why)}", highlight=False)
            skipped.append({"task": key, "reason": why})
            write_partial()

        res = evaluate(
            model,
            tokenizer,
            suite,
            data_root=root,
            fewshot=cfg.fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            max_seq_len=cfg.max_seq_len,
            log_samples=cfg.log_samples,
            on_task=progress,
            on_skip=skip,
            on_batch=bar,
        )
        d = res.to_dict(samples=False)
        results.update(
            tasks=d["tasks"],
            gauntlet=d["gauntlet"],
            seconds=d["seconds"],
            items=d["items"],
            skipped=d["skipped"],
        )
        samples = {t.key: t.samples for t in res.tasks} if cfg.log_samples else {}
    if cfg.perplexity:
        from rich.console import Console

        from smalto.eval.perplexity import perplexity

        ppl_bar = _batch_bar(Console(stderr=True), rank0)
        results["perplexity"] = perplexity(
            model,
            cfg.perplexity,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            on_batch=lambda done, total: ppl_bar("perplexity", done, total),
        )
    if cfg.ppl_by_position and window:
        from rich.console import Console

        from smalto.eval.by_position import DEFAULT_BUCKETS, perplexity_by_position

        pos_bar = _batch_bar(Console(stderr=True), rank0)
        results["perplexity_by_position"] = perplexity_by_position(
            model,
            cfg.ppl_by_position,
            length=window[0],
            trained_length=window[1],
            tokenizer=tokenizer,
            buckets=cfg.buckets or DEFAULT_BUCKETS,
            limit=cfg.limit,
            on_batch=lambda done, total: pos_bar("perplexity by position", done, total),
        )
    if rank0:
        print_results(results)
        if cfg.out:
            write_results(cfg.out, results, samples)
    return results


def _batch_bar(console: Any, show: bool) -> Any:
    """on_batch(key, done, total): a one-line progress display within a task, updated in place on a terminal
    (`key done/total batches, ETA`); off a terminal one plain line per quarter of the task, so logs stay short."""
    import time

    state: dict[str, Any] = {"key": None, "t0": 0.0, "shown": -1}

    def on_batch(key: str, done: int, total: int) -> None:
        if not show or total <= 0:
            return
        now = time.perf_counter()
        if key != state["key"]:
            state.update(key=key, t0=now, shown=-1)
        left = (now - state["t0"]) / done * (total - done)
        line = f"{key}: {done}/{total} batches, ETA {left:.0f}s"
        if console.is_terminal:
            console.file.write("\r" + line.ljust(60) + ("\n" if done == total else ""))
            console.file.flush()
        elif (quarter := 4 * done // total) > state["shown"]:
            state["shown"] = quarter
            console.print(line, highlight=False, markup=False)

    return on_batch


def _check_out(out: str) -> None:
    """--out is a folder: refuse a file there (or on the way) before hours of evaluation, not after."""
    from pathlib import Path

    p = Path(out)
    for f in (p, *p.parents):
        if f.exists():
            if not f.is_dir():
                raise ConfigError(
                    f"--out {out}: {f} is a file; --out names a folder for results.json, samples/ and results.png"
                )
            if not os.access(f, os.W_OK):
                raise ConfigError(f"--out {out}: {f} is not writable; choose another folder")
            return


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _init_distributed() -> tuple[bool, bool]:
    """Under torchrun (WORLD_SIZE > 1): one process group, NCCL on GPUs, gloo on CPU. Returns (distributed, whether
    this call created the group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, False
    import torch

    if torch.distributed.is_initialized():
        return True, False
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True, True


def _rank_device(device: str) -> str:
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device
