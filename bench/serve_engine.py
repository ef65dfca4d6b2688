"""The serving engine alone, without HTTP: the load of `bench/serve_load.py` driven straight into `Engine`, with
where each step's time goes.

    python bench/serve_engine.py --shape 7b --device cuda --max-batch 64 --prefill-chunks 512,2048 --prefill graphs,eager
    python bench/serve_engine.py --smoke                                    # tiny random model on CPU

The same requests as serve_load (ShareGPT-like lengths, `--num-prompts`, at most `--concurrency` in flight, all
sent at once: saturation), submitted from the engine's own callbacks (a request that finishes submits the next), so
the figures are the engine's: no event loop, JSON or sockets. Per `--prefill-chunks` value and `--prefill` mode (the
packed prefill's captured CUDA graphs, or the same forward run eagerly), one engine:
  - output tokens/s, TTFT, TPOT and inter-token latency p50 / p90 / p99 (TTFT from submission);
  - the step period (one engine step to the next) over the steps that ran no prefill with at least 90% of the
    slots decoding: the decode step at that batch with the load's own lengths (the denominator of issue 25's
    TPOT target), and over the steps that did prefill, with the prompt tokens they wrote;
  - the host's share: time in prefill (launching it, and its first tokens' samples), in queueing the decode step,
    and in taking the previous step's tokens (mostly waiting for the device when the host is ahead).
Writes serve_engine.json to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from serve_load import ROOT, SHAPES, build_folder, lengths, percentiles


class Trace:
    """Wraps an engine's step phases with host timers (from outside: the engine is unchanged)."""

    def __init__(self, engine: Any):
        self.steps: list[dict[str, float]] = []
        self.cur: dict[str, float] = {}
        self.engine = engine
        dec = engine.dec
        for name in ("_prefill", "_launch", "_land"):
            setattr(engine, name, self._timed(name, getattr(engine, name)))
        step = engine.step

        def traced_step() -> None:
            self.cur = {"t": time.perf_counter(), "prefill_tokens": 0.0}
            step()
            self.cur["running"] = sum(s is not None for s in engine.slots)
            self.steps.append(self.cur)

        engine.step = traced_step
        prefill, packed = dec.prefill, dec.prefill_packed

        def counted(slot: int, ids: list[int], *a: Any, **k: Any) -> Any:
            self.cur["prefill_tokens"] += len(ids)
            return prefill(slot, ids, *a, **k)

        def counted_packed(parts: list[tuple[int, list[int]]]) -> Any:
            self.cur["prefill_tokens"] += sum(len(ids) for _, ids in parts)
            return packed(parts)

        dec.prefill, dec.prefill_packed = counted, counted_packed

    def _timed(self, name: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cur[name.strip("_")] = time.perf_counter() - t0

        return run

    def summary(self, max_batch: int) -> dict[str, Any]:
        steps = self.steps
        period = [(b["t"] - a["t"], a) for a, b in itertools.pairwise(steps)]
        full = [p for p, s in period if s["prefill_tokens"] == 0 and s["running"] >= 0.9 * max_batch]
        with_prefill = [(p, s) for p, s in period if s["prefill_tokens"] > 0]
        n = max(1, len(steps))
        return {
            "steps": len(steps),
            "decode_step": percentiles(full) | {"n": len(full)},
            "prefill_step": percentiles([p for p, _ in with_prefill]) | {"n": len(with_prefill)},
            "prefill_tokens_per_prefill_step": sum(s["prefill_tokens"] for _, s in with_prefill)
            / max(1, len(with_prefill)),
            "host_mean_ms": {
                k: 1e3 * sum(s.get(k, 0.0) for s in steps) / n for k in ("prefill", "launch", "land")
            },
        }


def drive(engine: Any, work: list[tuple[list[int], int]], concurrency: int) -> dict[str, Any]:
    """Saturation: `concurrency` requests at once, each finished one replaced by the next, until `work` is done."""
    from smalto.sampling import SamplingParams
    from smalto.serve.engine import Output, Request

    lock, done = threading.Lock(), threading.Event()
    queue = list(reversed(work))
    records: list[dict[str, Any]] = []
    left = [len(work)]

    def submit_next() -> None:
        with lock:
            if not queue:
                return
            prompt, n_out = queue.pop()
        rec: dict[str, Any] = {"t0": time.perf_counter(), "times": [], "n": n_out}
        records.append(rec)

        def emit(out: Output) -> None:
            now = time.perf_counter()
            rec["times"].extend([now] * out.n_tokens)
            if out.finish_reason is not None:
                rec["end"] = now
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
                submit_next()

        engine.submit(
            Request(
                prompt=prompt,
                emit=emit,
                params=SamplingParams(temperature=0.0),
                max_tokens=n_out,
                ignore_eos=True,
            )
        )

    t0 = time.perf_counter()
    for _ in range(min(concurrency, len(work))):
        submit_next()
    done.wait()
    wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["t0"] for r in records if r["times"]]
    steady = [r["times"][0] - r["t0"] for r in records[concurrency:] if r["times"]]  # after the opening burst
    tpot = [(r["end"] - r["times"][0]) / (len(r["times"]) - 1) for r in records if len(r["times"]) > 1]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(len(r["times"]) for r in records)
    return {
        "requests_per_s": len(records) / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft": percentiles(ttft),
        "ttft_steady": percentiles(steady),
        "tpot": percentiles(tpot),
        "itl": percentiles(itl),
    }


def ms(d: dict[str, float]) -> str:
    return " / ".join(f"{d[p] * 1e3:.1f}" for p in ("p50", "p90", "p99"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF folder")
    ap.add_argument(
        "--shape", default="7b", help="build a random-weight MPT of this shape (serve_load's SHAPES)"
    )
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/tokenizers/gpt-neox-20b"))
    ap.add_argument("--workdir", default="/tmp/smalto-serve-load")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--prefill-chunks", default="2048", help="comma-separated: one engine each")
    ap.add_argument(
        "--prefill",
        default="graphs",
        help="comma-separated, one engine each per chunk: graphs (the captured packed prefill) | eager",
    )
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--random", action="store_true", help="random weights made in memory (no folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on CPU, a few requests")
    a = ap.parse_args()
    scale = 1.0
    if a.smoke:
        a.shape, a.device, a.dtype, a.max_batch, a.max_seq_len = "tiny", "cpu", "float32", 4, 128
        a.concurrency, a.num_prompts, a.prefill_chunks, scale = 4, 8, "16,64", 0.05
    import torch

    from smalto.load import load_model_and_tokenizer
    from smalto.serve.engine import Engine

    folder = Path(a.model) if a.model else Path(a.workdir) / a.shape
    if (
        not a.model and not a.random
    ):  # in a process of its own: its memory goes back before the engine's cache is made
        args = (a.shape, a.tokenizer, folder, a.device, a.dtype, a.max_seq_len)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(build_folder, *args).result()
    rng = random.Random(a.seed)
    work = [
        ([rng.randrange(1000, 30000) for _ in range(p)], o)
        for p, o in lengths(a.num_prompts, a.max_seq_len, rng, scale)
    ]
    if a.random:  # the shape's random weights made where they run: no folder written or read
        from smalto.kernels import apply_inference
        from smalto.model.config import MPTConfig
        from smalto.model.mpt import MPTForCausalLM
        from smalto.tokenizer import load_tokenizer

        cfg = {
            **SHAPES[a.shape],
            "max_seq_len": a.max_seq_len,
            "no_bias": True,
            "attn_config": {"alibi": True},
        }
        torch.manual_seed(a.seed)
        model = MPTForCausalLM(MPTConfig.from_dict(cfg), device=a.device).to(getattr(torch, a.dtype))
        model, tok = apply_inference(model), load_tokenizer(a.tokenizer)
    else:
        model, tok = load_model_and_tokenizer(
            str(folder), None, dtype=a.dtype, device=a.device, max_seq_len=a.max_seq_len
        )
    model.eval()
    rows = []
    for chunk, mode in itertools.product([int(c) for c in a.prefill_chunks.split(",")], a.prefill.split(",")):
        if mode not in ("graphs", "eager"):
            ap.error(f"--prefill {mode!r}: graphs or eager")
        engine = Engine(model, tok, max_batch=a.max_batch, max_queue=a.num_prompts, prefill_chunk=chunk)
        engine.dec.packed.use_graphs = mode == "graphs"
        engine.warmup()
        engine.start()
        drive(engine, work[: a.concurrency], a.concurrency)  # warm up: the prefill shapes, the allocator
        trace = Trace(engine)
        res = drive(engine, work, a.concurrency)
        engine.shutdown()
        res |= trace.summary(a.max_batch) | {"prefill_chunk": chunk, "prefill": mode}
        res |= {"compiled": engine.dec.compiled, "graphs": sorted(engine.dec.packed.graphs)}
        print(f"chunk {chunk} {mode}: decode compiled {res['compiled']}, prefill graphs {res['graphs']}")
        rows.append(res)
        del engine, trace
        gc.collect()  # the decoder and its packed prefill refer to each other: the cache goes with the cycle
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\nengine alone, {a.num_prompts} requests, {a.concurrency} in flight, max batch {a.max_batch}")
    print(
        "| prefill chunk | prefill | out tok/s | TTFT p50/p90/p99 ms | after the burst | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | "
        "decode step p50/p90/p99 ms | prefill step p50 ms (tokens) | host prefill / launch / land ms a step |"
    )
    print("| ---: | --- | ---: | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        h = r["host_mean_ms"]
        print(
            f"| {r['prefill_chunk']} | {r['prefill']} | {r['output_tokens_per_s']:,.0f} | {ms(r['ttft'])} | {ms(r['ttft_steady'])} | "
            f"{ms(r['tpot'])} | "
            f"{ms(r['itl'])} | {ms(r['decode_step'])} (n {r['decode_step']['n']}) | "
            f"{r['prefill_step']['p50'] * 1e3:.1f} ({r['prefill_tokens_per_prefill_step']:.0f}) | "
            f"{h['prefill']:.2f} / {h['launch']:.2f} / {h['land']:.2f} |"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_engine.json").write_text(json.dumps({"rows": rows, "args": vars(a)}, indent=1))
    print(f"wrote {out / 'serve_engine.json'}")


if __name__ == "__main__":
    main()
