"""Quality gate of quantized weights: train the MPT-125M recipe on real text, then score it in bf16, int8 and int4.

    python bench/quant_quality.py --build-corpus CORPUS          # real text from ../shared/icl_data (≤ 15 MB)
    python bench/quant_quality.py --corpus CORPUS                # on a GPU: data, train, convert, eval (< 6 min)
    python bench/quant_quality.py --smoke                        # tiny model on CPU, the same steps, in seconds

The corpus. `--build-corpus DIR` writes DIR/text.jsonl (one {"text": ...} document a line), DIR/tokenizer/ (the
GPT-NeoX tokenizer), DIR/icl/ (the files of the ICL tasks scored) and DIR/corpus.json (sources, documents, bytes,
sha256), ≤ 15 MB together, so the folder is all a machine without ../shared needs. A document is one item of an llm-foundry ICL file
with its gold answer: a reading-comprehension passage with its question, a LAMBADA passage, a PubMed abstract, a
grade-school or competition math problem with its worked solution, a trivia question with its answer, a function
with its body, … Files are read in a fixed order; a paragraph (line) of 40 or more characters seen before is
dropped (a passage shared by several questions is kept once), then an exact repeat of a whole document; sources
stop being added when the byte budget is spent, the largest (MATH) last. Left out: the ICL tasks scored below
(piqa, arc_easy, and arc_challenge beside it), and generated strings that are not text (arithmetic, Dyck words,
random-letter algorithm puzzles) or not English (language identification).

The run, each step the user-facing command in a subprocess, in WORK (default runs/quant-quality, replaced):
  1. `smalto data CORPUS/text.jsonl --val-fraction 0.05`: the held-out split is 5% of the documents (stable hash).
  2. `smalto train mpt-125m` with the corpus: the recipe's model, optimizer and precision, with a global batch of
     32 × 2048 tokens (the corpus is ~3M tokens: the recipe's 256 would be a dozen steps an epoch) for `--epochs`
     passes over the training split (the cosine schedule spans them, warmup 5%), stopped by `--seconds`
     (`train.time_limit`) if sooner. The corpus is small, so epochs, not time, bound a run on an H200:
     a 125M model on ~3M tokens overfits after a few passes, and a gate measured on an overfitted model would
     measure memorisation.
  3. `smalto convert HF INT4SYM --quantize int4 --symmetric` (eval's --quantize is asymmetric int4).
  4. `smalto eval MODEL --perplexity DATA/val --tasks piqa,arc_easy --fewshot 0 [--quantize ...]` for bf16, int8,
     int4 (group 128, asymmetric), the symmetric folder, and int8 / int4 with `--quantize-head` (the tied
     embedding / unembedding quantized too; no target): held-out perplexity and ICL accuracy (0-shot; near
     chance for so small a model, so differences within a few points are noise; perplexity is the gate).
The table gives each format's loss, perplexity, its increase over bf16 (targets: int8 ≤ +0.5%, int4 g128 ≤ +3%)
and the accuracies; quant_quality.json (and the commands' log.txt) go to $OUT when set (else WORK).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ICL_DATA = REPO.parent / "shared" / "icl_data"
TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt-neox-20b"
BUDGET_MB = 15.0
# Read in this order (prose first, MATH last: it is the largest and the most formula-heavy).
SOURCES = [
    "language_understanding/lambada_openai.jsonl",
    "reading_comprehension/boolq.jsonl",
    "reading_comprehension/pubmed_qa_labeled.jsonl",
    "reading_comprehension/agi_eval_sat_en.jsonl",
    "reading_comprehension/agi_eval_lsat_rc.jsonl",
    "reading_comprehension/agi_eval_lsat_lr.jsonl",
    "reading_comprehension/bigbench_understanding_fables.jsonl",
    "commonsense_reasoning/bigbench_strange_stories.jsonl",
    "commonsense_reasoning/siqa.jsonl",
    "commonsense_reasoning/commonsense_qa.jsonl",
    "commonsense_reasoning/bigbench_strategy_qa.jsonl",
    "commonsense_reasoning/openbook_qa.jsonl",
    "commonsense_reasoning/copa.jsonl",
    "commonsense_reasoning/bigbench_novel_concepts.jsonl",
    "language_understanding/winogrande.jsonl",
    "language_understanding/winograd_wsc.jsonl",
    "language_understanding/bigbench_conceptual_combinations.jsonl",
    "language_understanding/bigbench_conlang_translation.jsonl",
    "world_knowledge/triviaqa_sm_sub.jsonl",
    "world_knowledge/jeopardy_all.jsonl",
    "world_knowledge/bigbench_qa_wikidata.jsonl",
    "world_knowledge/bigbench_misconceptions.jsonl",
    "world_knowledge/bigbench_movie_recommendation.jsonl",
    "safety/enterprise_pii_classification.jsonl",
    "safety/winogender_mc_female.jsonl",
    "safety/winogender_mc_male.jsonl",
    "symbolic_problem_solving/logi_qa.jsonl",
    "symbolic_problem_solving/agi_eval_lsat_ar.jsonl",
    "symbolic_problem_solving/bigbench_logical_deduction.jsonl",
    "symbolic_problem_solving/gsm8k.jsonl",
    "symbolic_problem_solving/svamp.jsonl",
    "symbolic_problem_solving/aqua.jsonl",
    "symbolic_problem_solving/agi_eval_sat_math.jsonl",
    "symbolic_problem_solving/math_qa.jsonl",
    "symbolic_problem_solving/bigbench_operators.jsonl",
    "programming/human_eval.jsonl",
    "programming/processed_human_eval_cpp.jsonl",
    "programming/processed_human_eval_js.jsonl",
    "symbolic_problem_solving/math.jsonl",
]
ICL_TASKS = "piqa,arc_easy"  # held out of the corpus (with arc_challenge); their files travel in CORPUS/icl/
TASK_FILES = ["commonsense_reasoning/piqa.jsonl", "world_knowledge/arc_easy.jsonl"]
FORMATS = {  # name: (eval flags, or None for the converted symmetric folder)
    "bf16": [],
    "int8": ["--quantize", "int8"],
    "int4 g128": ["--quantize", "int4", "--group-size", "128"],
    "int4 g128 sym": None,
    "int8 +head": ["--quantize", "int8", "--quantize-head"],
    "int4 g128 +head": ["--quantize", "int4", "--group-size", "128", "--quantize-head"],
}
TARGETS = {"int8": 0.005, "int4 g128": 0.03, "int4 g128 sym": 0.03}


# ---- the corpus ----


def document(row: dict[str, Any]) -> str:
    """One ICL item as text: its context with the gold answer (the fields of llm-foundry's formats)."""
    if "context_options" in row:  # schema: the gold context, then the continuation
        return f"{row['context_options'][row['gold']]} {row['continuation']}"
    if "canonical_solution" in row:  # code: the prompt and its body
        return row["prompt"] + row["canonical_solution"]
    if "query" in row:  # multiple choice: the question (passage, options) and the gold choice
        return f"{row['query'].rstrip()} {row['choices'][row['gold']]}"
    if "chain_of_thought" in row:  # a problem with its worked solution
        return f"{row['context']}\n{row['chain_of_thought']}\n{row['answer']}"
    if "continuation" in row:
        return f"{row['context']} {row['continuation']}"
    return f"{row['context']} {row['answer']}"


def build_corpus(out: Path, icl_data: Path, tokenizer: Path, budget_mb: float = BUDGET_MB) -> dict[str, Any]:
    """Write text.jsonl, tokenizer/ and corpus.json into `out` (see the module docstring); returns corpus.json."""
    tok_files = [
        p for p in sorted(tokenizer.iterdir()) if p.name in ("tokenizer.json", "tokenizer_config.json")
    ]
    if not any(p.name == "tokenizer.json" for p in tok_files):
        raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer.json there")
    carried = [*tok_files, *(icl_data / name for name in TASK_FILES)]
    budget = int(budget_mb * 1e6) - sum(p.stat().st_size for p in carried) - 10_000  # corpus.json
    seen: set[bytes] = set()
    lines: list[str] = []
    used: dict[str, dict[str, int]] = {}
    size = 0
    for name in SOURCES:
        path = icl_data / name
        if not path.is_file():
            raise SystemExit(f"--icl-data {icl_data}: {name} is missing")
        docs = nbytes = 0
        with open(path, encoding="utf-8") as f:
            for raw in f:
                text = _dedupe(document(json.loads(raw)), seen)
                if text is None:
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                n = len(line.encode())
                if size + n > budget:
                    break
                lines.append(line)
                size, docs, nbytes = size + n, docs + 1, nbytes + n
        used[name] = {"documents": docs, "bytes": nbytes}
        if size + 1000 > budget:
            break
    out.mkdir(parents=True, exist_ok=True)
    body = "".join(lines).encode()
    (out / "text.jsonl").write_bytes(body)
    (out / "tokenizer").mkdir(exist_ok=True)
    for p in tok_files:
        shutil.copyfile(p, out / "tokenizer" / p.name)
    for name in TASK_FILES:
        (out / "icl" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(icl_data / name, out / "icl" / name)
    meta = {
        "documents": len(lines),
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "sources": used,
        "held_out_tasks": ICL_TASKS.split(","),
        "built_by": "python bench/quant_quality.py --build-corpus",
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _dedupe(text: str, seen: set[bytes]) -> str | None:
    """The document without paragraphs seen before (40+ characters), or None if nothing new is left."""
    keep = []
    for para in text.split("\n"):
        key = para.strip()
        if len(key) >= 40:
            h = hashlib.sha1(b"p" + key.encode()).digest()
            if h in seen:
                continue
            seen.add(h)
        keep.append(para)
    doc = "\n".join(keep).strip()
    h = hashlib.sha1(b"d" + doc.encode()).digest()
    if len(doc) < 20 or h in seen:
        return None
    seen.add(h)
    return doc


# ---- the run ----


def smalto(*args: str, log: Path) -> float:
    """Run `python -m smalto ARGS`, its output appended to `log`; returns the seconds it took."""
    cmd = [sys.executable, "-m", "smalto", *args]
    print("$ smalto " + " ".join(args), flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if p.returncode != 0:
        if os.environ.get("OUT"):
            shutil.copyfile(log, Path(os.environ["OUT"]) / "log.txt")
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{tail}\nsmalto {args[0]} failed (exit status {p.returncode}); the log: {log}")
    return time.perf_counter() - t


def train_args(args: argparse.Namespace, data: Path, tok: Path, run: Path) -> list[str]:
    """`smalto train` arguments: the recipe, the corpus, the run length."""
    steps = planned_steps(args, data)
    over = [
        f"run_dir={run}",
        f"tokenizer={tok}",
        f"data.sources=[{{path: {data}}}]",
        f"train.global_batch_size={args.batch}",
        f"train.max_duration={steps}ba",
        f"train.time_limit={args.seconds}s",
        "scheduler.warmup=0.05dur",
        f"train.eval_interval={steps}ba",
        f"checkpoint.interval={steps}ba",
        "logging.progress=false",
    ]
    if args.smoke:
        over += [
            "model.d_model=128",
            "model.n_heads=4",
            "model.n_layers=2",
            f"model.max_seq_len={args.seq_len}",
            f"data.seq_len={args.seq_len}",
            "data.num_workers=0",
            "train.micro_batch_size=4",
            "train.precision=fp32",
            "train.compile=false",
            "train.eval_batches=1",
        ]
    return ["train", "mpt-125m", *over, *args.override]


def planned_steps(args: argparse.Namespace, data: Path) -> int:
    """Optimizer steps for --epochs passes over the training split (at most --max-steps)."""
    meta = json.loads((data / "smalto_data.json").read_text())
    steps = max(1, args.epochs * _split_samples(meta, "train") // args.batch)
    return min(steps, args.max_steps or steps)


def _split_samples(meta: dict[str, Any], split: str) -> int:
    """Samples of a split in smalto_data.json (summed over its sources)."""
    total = 0
    for src in meta.get("sources", [meta]):
        stats = src.get("splits", src).get(split, {})
        total += int(stats.get("samples", 0))
    if total == 0:
        raise SystemExit(f"smalto_data.json has no {split} samples: {json.dumps(meta)[:500]}")
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    marker = work / ".quant_quality"
    if work.exists():
        if not marker.exists() and any(work.iterdir()):
            raise SystemExit(f"--work {work} exists and is not a folder this script made; choose another")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    marker.touch()
    log = work / "log.txt"
    if args.smoke:  # a small corpus of its own
        corpus = work / "corpus"
        build_corpus(corpus, Path(args.icl_data), Path(args.tokenizer), budget_mb=args.smoke_mb)
    else:
        corpus = Path(args.corpus).resolve()
    tok, data, run_dir = corpus / "tokenizer", work / "data", work / "run"
    seconds: dict[str, float] = {}
    seconds["data"] = smalto(
        "data", str(corpus / "text.jsonl"), "-o", str(data), "-t", str(tok), "--seq-len", str(args.seq_len),
        "--val-fraction", "0.05", "-j", str(args.workers), "--no-progress", log=log,
    )  # fmt: skip
    seconds["train"] = smalto(*train_args(args, data, tok, run_dir), log=log)
    hf = run_dir / "hf"
    sym = work / "int4-sym"
    formats = {name: FORMATS[name] for name in args.formats}
    if any(flags is None for flags in formats.values()):
        seconds["convert"] = smalto(
            "convert", str(hf), str(sym), "--quantize", "int4", "--group-size", "128", "--symmetric", log=log
        )
    rows = []
    for name, flags in formats.items():
        out = work / "eval" / name.replace(" +", " ").replace(" ", "-")
        model = str(sym) if flags is None else str(hf)
        extra = ["--limit", str(args.limit)] if args.limit else []
        seconds[f"eval {name}"] = smalto(
            "eval", model, "--perplexity", str(data / "val"), "--tasks", args.tasks, "--fewshot", "0",
            "--data-root", str(corpus / "icl"), "--batch-size", str(args.eval_batch), "--out", str(out),
            "--device", args.device, *extra, *(flags or []), log=log,
        )  # fmt: skip
        res = json.loads((out / "results.json").read_text())
        ppl = res["perplexity"]
        acc = {f"{t['label']}/{t['num_fewshot']}-shot": t["accuracy"] for t in res["tasks"]}
        rows.append(
            dict(format=name, loss=ppl["loss"], perplexity=ppl["perplexity"], tokens=ppl["tokens"], **acc)
        )
        print(f"  {name}: perplexity {ppl['perplexity']:.4f} ({ppl['perplexity'] / rows[0]['perplexity'] - 1:+.3%} "
              f"vs {rows[0]['format']}), {json.dumps(acc)}", flush=True)  # fmt: skip
    base = rows[0]["perplexity"]
    for r in rows:
        r["vs_bf16"] = r["perplexity"] / base - 1
        target = TARGETS.get(r["format"])
        r["target"] = target
        r["meets_target"] = None if target is None else r["vs_bf16"] <= target
    trained = {"planned_steps": planned_steps(args, data), **_trained(run_dir)}
    return {"rows": rows, "seconds": seconds, "training": trained, "corpus": _corpus_meta(corpus)}


def _trained(run_dir: Path) -> dict[str, Any]:
    """Steps, tokens, training seconds and the last train / held-out loss, from the run's metrics.jsonl."""
    out: dict[str, Any] = {"seconds": 0.0}
    names = {"step": "steps", "train/tokens": "tokens", "train/loss": "loss", "eval/loss": "val_loss"}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.update({name: m[key] for key, name in names.items() if m.get(key) is not None})
        out["seconds"] += m.get("time/step_s") or 0.0
    return out


def _corpus_meta(corpus: Path) -> dict[str, Any]:
    meta = json.loads((corpus / "corpus.json").read_text())
    return {k: meta[k] for k in ("documents", "bytes", "sha256")}


def report(result: dict[str, Any]) -> None:
    tasks = [k for k in result["rows"][0] if "/" in k]  # ICL keys, e.g. piqa/0-shot
    cols = ["format", "loss", "perplexity", "vs bf16", "target", *tasks]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in result["rows"]:
        target = (
            "" if r["target"] is None else f"≤ +{r['target']:.1%} {'met' if r['meets_target'] else 'MISSED'}"
        )
        cells = [
            r["format"],
            f"{r['loss']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['vs_bf16']:+.2%}",
            target,
            *(f"{r[t]:.4f}" for t in tasks),
        ]
        print("| " + " | ".join(cells) + " |")
    t = result["training"]
    print(f"\ntrained: {json.dumps(t)}; held-out tokens: {result['rows'][0]['tokens']}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-corpus", metavar="DIR", help="write the corpus folder and exit")
    ap.add_argument("--corpus", metavar="DIR", help="a folder --build-corpus wrote")
    ap.add_argument(
        "--icl-data", default=str(ICL_DATA), help="llm-foundry's ICL files (--build-corpus, --smoke)"
    )
    ap.add_argument("--tokenizer", default=str(TOKENIZER), help="the tokenizer (--build-corpus, --smoke)")
    ap.add_argument("--work", default="runs/quant-quality", help="run folder (replaced)")
    ap.add_argument("--epochs", type=int, default=6, help="passes over the training split")
    ap.add_argument("--seconds", type=int, default=240, help="training time limit")
    ap.add_argument("--max-steps", type=int, default=None, help="at most this many optimizer steps")
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tasks", default=ICL_TASKS, help="ICL tasks scored beside perplexity")
    ap.add_argument("--limit", type=int, default=None, help="items per task and held-out samples")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument("--override", action="append", default=[], help="another `smalto train` KEY=VALUE")
    ap.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated, bf16 first; of: {', '.join(FORMATS)}"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a small corpus, a few steps")
    ap.add_argument("--smoke-mb", type=float, default=3.2, help="--smoke: corpus budget, tokenizer included")
    args = ap.parse_args()
    args.formats = [f.strip() for f in args.formats.split(",")]
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown or args.formats[0] != "bf16":
        raise SystemExit(
            f"--formats: {', '.join(unknown) or 'bf16 must come first'}; of: {', '.join(FORMATS)}"
        )
    if args.build_corpus:
        meta = build_corpus(Path(args.build_corpus), Path(args.icl_data), Path(args.tokenizer))
        total = sum(p.stat().st_size for p in Path(args.build_corpus).rglob("*") if p.is_file())
        print(f"wrote {args.build_corpus}: {meta['documents']} documents, {meta['bytes'] / 1e6:.1f} MB of text, "
              f"{total / 1e6:.1f} MB in all")  # fmt: skip
        return
    if args.smoke:
        args.device, args.seq_len, args.epochs, args.batch, args.max_steps = "cpu", 128, 1, 8, 3
        args.limit, args.eval_batch, args.workers = args.limit or 8, 8, 1
    elif not args.corpus:
        raise SystemExit("give --corpus DIR (from --build-corpus DIR), --build-corpus DIR or --smoke")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    report(result)
    out = Path(os.environ.get("OUT") or args.work) / "quant_quality.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if os.environ.get("OUT"):
        shutil.copyfile(Path(args.work) / "log.txt", Path(os.environ["OUT"]) / "log.txt")
    print(f"wrote {out}")
    if any(not math.isfinite(r["perplexity"]) for r in result["rows"]):
        raise SystemExit("a perplexity is not finite")


if __name__ == "__main__":
    main()
