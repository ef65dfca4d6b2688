"""What `smalto eval` shows and writes: a rich table, results.json, samples/*.jsonl, a bar chart PNG.

OUT/results.json    {"model", "tasks": [{label, num_fewshot, icl_task_type, accuracy, n, seconds, categories, metrics}],
                     "gauntlet": {categories, averages, benchmarks, missing} | null, "perplexity": {...} | null,
                     "skipped": [{task, reason}], "complete": true}
                    rewritten after every task (with "complete": false) while a run is in progress
OUT/samples/LABEL_Kshot.jsonl   with --log-samples: per item prompt, options, scores, prediction, correct
OUT/results.png     accuracy per task (and gauntlet category scores), when matplotlib is installed
OUT/ppl_by_position.png   with --ppl-by-position: perplexity per position bucket, when matplotlib is installed
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def print_results(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if results.get("tasks"):
        t = Table(title="ICL tasks")
        for col, kw in (
            ("task", {}),
            ("shots", {"justify": "right"}),
            ("format", {}),
            ("accuracy", {"justify": "right"}),
            ("items", {"justify": "right"}),
            ("seconds", {"justify": "right"}),
        ):
            t.add_column(col, **kw)  # type: ignore[arg-type]
        for r in results["tasks"]:
            t.add_row(
                r["label"],
                str(r["num_fewshot"]),
                r["icl_task_type"],
                f"{r['accuracy']:.4f}",
                str(r["n"]),
                f"{r['seconds']:.1f}",
            )
        console.print(t)
    g = results.get("gauntlet")
    if g:
        t = Table(title="Gauntlet (accuracy above random, rescaled)")
        t.add_column("category")
        t.add_column("score", justify="right")
        for k, v in g["categories"].items():
            t.add_row(k, f"{v:.4f}")
        for k, v in g["averages"].items():
            t.add_row(f"[bold]{k}[/]", f"[bold]{v:.4f}[/]")
        console.print(t)
        if g["missing"]:
            console.print(f"[yellow]not evaluated, left out of the gauntlet:[/] {', '.join(g['missing'])}")
    for s in results.get("skipped") or []:
        console.print(f"[yellow]skipped[/] {escape(s['task'])}: {escape(s['reason'])}", highlight=False)
    ppl = results.get("perplexity")
    if ppl:
        console.print(
            f"perplexity {ppl['perplexity']:.4f} (loss {ppl['loss']:.4f}) over {ppl['tokens']:,} tokens of {ppl['data']}"
        )
    pos = results.get("perplexity_by_position")
    if pos:
        console.print(position_table(pos))


def position_table(pos: dict[str, Any]) -> Table:
    t = Table(
        title=f"Perplexity by position: {pos['windows']:,} windows of {pos['length']:,} tokens "
        f"(trained length {pos['trained_length']:,})"
    )
    for col in ("positions", "perplexity", "loss", "tokens"):
        t.add_column(col, justify="right")
    for b in pos["buckets"]:
        mark = " *" if b["beyond_training"] else ""
        t.add_row(
            f"{b['start']:,}–{b['end']:,}{mark}",
            f"{b['perplexity']:.4f}",
            f"{b['loss']:.4f}",
            f"{b['tokens']:,}",
        )
    t.caption = f"all: perplexity {pos['perplexity']:.4f} (loss {pos['loss']:.4f}); * past the trained length"
    return t


def write_partial_results(out: str | Path, results: dict[str, Any]) -> Path:
    """OUT/results.json with the tasks finished so far (`"complete": false`), replaced atomically."""
    from smalto.train.durable import replace_durably

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    replace_durably(out / "results.json", json.dumps(results, indent=2) + "\n")
    return out / "results.json"


def write_results(
    out: str | Path, results: dict[str, Any], samples: dict[str, list[dict[str, Any]]] | None = None
) -> list[Path]:
    """results.json, samples/*.jsonl and results.png in `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_partial_results(out, {**results, "complete": True})]
    if samples:
        (out / "samples").mkdir(exist_ok=True)
        for key, records in samples.items():
            f = out / "samples" / f"{key.replace('/', '_')}.jsonl"
            f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            written.append(f)
    png = bar_chart(out / "results.png", results)
    if png is not None:
        written.append(png)
    if results.get("perplexity_by_position"):
        from smalto.eval.by_position import position_chart

        png = position_chart(
            out / "ppl_by_position.png", results["perplexity_by_position"], str(results["model"])
        )
        if png is not None:
            written.append(png)
    return written


def bar_chart(path: Path, results: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    bars = [(f"{r['label']} ({r['num_fewshot']}-shot)", r["accuracy"]) for r in results.get("tasks", [])]
    g = results.get("gauntlet") or {}
    bars += [(f"gauntlet: {k}", v) for k, v in {**g.get("categories", {}), **g.get("averages", {})}.items()]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(bars) + 1.2))
    ax.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1], color="#4c72b0")
    ax.set_xlabel("accuracy / gauntlet score")
    ax.set_title(str(results.get("model", "")))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
