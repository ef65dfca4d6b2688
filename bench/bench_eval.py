"""ICL evaluation throughput: the gauntlet's tasks (with programming) on an MPT shape (random weights).

    python bench/bench_eval.py --device cuda                      # every gauntlet task, full sets, bf16, MPT-1B
    python bench/bench_eval.py --device cuda --shape mpt-7b --limit 200   # MPT-7B, at most 200 items a task
    python bench/bench_eval.py --smoke                            # tiny model on CPU, 8 items a task

--shape names a recipe in configs/ (mpt-1b, mpt-7b, ...): its model section is the shape. Code tasks sample up to
their llm-foundry budget (random weights rarely stop early, so this is their worst case) and run every completion's
tests in the sandbox. Per task: items, seconds, items/s; plus the total and any skipped task with its reason.
Accuracy of random weights is meaningless and not shown.
Writes bench_eval.json into $OUT when that is set. Needs ../shared/icl_data and ../shared/tokenizers/gpt-neox-20b
(run from the repo root) or --data-root / --tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from smalto.eval.runner import evaluate
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tasks", default="gauntlet", help="suite, task labels or YAML (comma-separated)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-root", default="../shared/icl_data")
    p.add_argument("--tokenizer", default="../shared/tokenizers/gpt-neox-20b")
    p.add_argument("--shape", default="mpt-1b", help="recipe in configs/ whose model section is the shape")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 8 items a task")
    args = p.parse_args()
    if args.smoke:
        args.device, args.dtype, args.limit, args.batch_size = "cpu", "float32", 8, 8
        cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=1024, vocab_size=50432)
    else:
        from smalto.config import load_config

        cfg = load_config(args.shape, []).model

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(0)
    model = MPTForCausalLM(cfg, device=args.device).to(getattr(torch, args.dtype)).eval()
    console = Console()
    console.print(f"model: {model.num_params() / 1e9:.2f}B params on {args.device} ({args.dtype})")

    def progress(t) -> None:
        console.print(f"  {t.key}: {t.n} items in {t.seconds:.1f}s ({t.n / t.seconds:.1f} items/s)")

    def skipped(key: str, why: str) -> None:
        console.print(f"  {key}: skipped ({why})", markup=False)

    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = evaluate(
        model,
        tok,
        args.tasks.split(","),
        data_root=args.data_root,
        limit=args.limit,
        batch_size=args.batch_size,
        on_task=progress,
        on_skip=skipped,
    )
    total = time.perf_counter() - t0

    shape = "tiny" if args.smoke else args.shape
    table = Table(title=f"ICL eval, {shape} shape, {args.device}, batch {args.batch_size}")
    for col in ("task", "format", "items", "seconds", "items/s"):
        table.add_column(col, justify="left" if col in ("task", "format") else "right")
    rows = []
    for t in res.tasks:
        rows.append(
            {
                "task": t.key,
                "format": t.icl_task_type,
                "items": t.n,
                "seconds": t.seconds,
                "items_per_s": t.n / t.seconds,
            }
        )
        table.add_row(t.key, t.icl_task_type, str(t.n), f"{t.seconds:.1f}", f"{t.n / t.seconds:.1f}")
    table.add_row("total", "", str(res.items), f"{total:.1f}", f"{res.items / total:.1f}")
    console.print(table)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "shape": shape,
        "params": model.num_params(),
        "skipped": res.skipped,
        "total_items": res.items,
        "total_seconds": total,
        "items_per_s": res.items / total,
        "tasks": rows,
        "torch": torch.__version__,
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_eval.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
