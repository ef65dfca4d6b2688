"""Load test of `smalto serve` (and of the naive server a user would otherwise write) over HTTP.

    python bench/serve_load.py --shape 7b --tokenizer ../shared/tokenizers/gpt-neox-20b --max-batch 64 \
        --concurrency 64 --rates 2,4,8,16,inf --num-prompts 256 --baseline --offline --out $OUT
    python bench/serve_load.py --model runs/tiny/hf --rates 1,inf     # any HF folder
    python bench/serve_load.py --model runs/tiny/hf --dataset sharegpt.jsonl --rates 4,inf   # real conversations
    python bench/serve_load.py --smoke                                # a tiny random model on CPU, in seconds

Requests are streamed completions with token-id prompts, EOS ignored, so each has exactly the lengths drawn for it:
ShareGPT-like lognormal lengths (prompt median 200 tokens, output median 150, heavy tails, cut to the context), or
with `--dataset FILE.jsonl` real conversations (ShareGPT's `conversations` or OpenAI's `messages`): each request is
a conversation's first user turn, tokenized by the served folder's tokenizer, and asks for as many tokens as the
answer to it had (exchanges that do not fit the context are left out).
Arrivals are Poisson at each `--rates` value (requests/s; `inf`: all at once), at most `--concurrency` in flight.
Per rate: requests/s, output tokens/s, TTFT, TPOT (per request: (latency − TTFT) / (tokens − 1)) and inter-token
latency p50/p90/p99. `--baseline` runs the first `--baseline-prompts` requests at `--baseline-rates` against a
naive server (transformers' `generate` behind a lock: one request at a time, streamed); `--offline` times
`smalto.generate` on batches of `--max-batch` prompts with the same lengths (the throughput a server can hope
for). Writes serve_load.json and serve_load.png (latency
vs load) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, vocab_size=50432),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
}


def lengths(n: int, max_len: int, rng: random.Random, scale: float = 1.0) -> list[tuple[int, int]]:
    """(prompt, output) token counts, ShareGPT-like: lognormal, cut so that prompt + output fits `max_len`."""
    out = []
    for _ in range(n):
        p = max(4, int(rng.lognormvariate(math.log(200 * scale), 0.9)))
        o = max(2, int(rng.lognormvariate(math.log(150 * scale), 0.8)))
        p = min(p, max_len // 2)
        out.append((p, min(o, max_len - p)))
    return out


USER, ASSISTANT = ("human", "user"), ("gpt", "assistant", "chatgpt", "bard", "bing")


def first_exchange(row: Any) -> tuple[str, str] | None:
    """The first user turn and the assistant's answer to it in one conversation: ShareGPT's `conversations`
    ({"from": "human" | "gpt", "value"}) or OpenAI's `messages` ({"role", "content"}); None when it has none."""
    turns = row.get("conversations", row.get("messages")) if isinstance(row, dict) else None
    if not isinstance(turns, list):
        raise ValueError('expected an object with a "conversations" or "messages" list')
    pairs = [
        (t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in turns if isinstance(t, dict)
    ]
    for (who, text), (who2, answer) in itertools.pairwise(pairs):
        if who in USER and who2 in ASSISTANT and isinstance(text, str) and isinstance(answer, str):
            return text, answer
    return None


def dataset_work(
    path: Path, tokenizer: Any, n: int, max_len: int, rng: random.Random
) -> list[tuple[list[int], int]]:
    """`n` requests from a JSONL of conversations (as vLLM's benchmark samples ShareGPT): each the first user
    turn's tokens and its answer's token count as the output length; exchanges with a prompt under 4 tokens, an
    answer under 2, or that do not fit `max_len` together are left out, not cut."""
    found = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                got = first_exchange(json.loads(line))
            except ValueError as e:  # json.JSONDecodeError is one
                raise SystemExit(f"error: {path}:{i}: {e}") from None
            if got is None:
                continue
            prompt = tokenizer(got[0], add_special_tokens=False)["input_ids"]
            n_out = len(tokenizer(got[1], add_special_tokens=False)["input_ids"])
            if len(prompt) >= 4 and n_out >= 2 and len(prompt) + n_out <= max_len:
                found.append((prompt, n_out))
    if not found:
        raise SystemExit(
            f"error: {path}: no conversation with a user turn and an answer that fit {max_len} tokens"
        )
    rng.shuffle(found)
    return [found[i % len(found)] for i in range(n)]


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    s = sorted(xs)
    return {f"p{q}": s[min(len(s) - 1, int(q / 100 * len(s)))] for q in (50, 90, 99)}


async def one(http: httpx.AsyncClient, url: str, prompt: list[int], n_out: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": n_out, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    times: list[float] = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":  # one chunk per token
                times.append(time.perf_counter())
    end = time.perf_counter()
    return {
        "ttft": times[0] - t0,
        "latency": end - t0,
        "tokens": n_out,
        "itl": [b - a for a, b in itertools.pairwise(times)],
    }


async def run_load(
    url: str, work: list[tuple[list[int], int]], rate: float, concurrency: int, seed: int
) -> dict:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:

        async def go(prompt: list[int], n_out: int) -> dict[str, Any]:
            async with sem:
                return await one(http, url, prompt, n_out)

        tasks = []
        t0 = time.perf_counter()
        for prompt, n_out in work:
            tasks.append(asyncio.create_task(go(prompt, n_out)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in res if r["tokens"] > 1]
    return {
        "rate": rate,
        "requests_per_s": len(res) / wall,
        "output_tokens_per_s": sum(r["tokens"] for r in res) / wall,
        "ttft": percentiles([r["ttft"] for r in res]),
        # the requests after the first `concurrency`: in flight beside others, not the opening burst's queue
        "ttft_steady": percentiles([r["ttft"] for r in res[concurrency:]]),
        "tpot": percentiles(tpot),
        "itl": percentiles([x for r in res for x in r["itl"]]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen(
        [*cmd, "--port", str(port)],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 1800
    while True:
        if p.poll() is not None:
            raise SystemExit(f"server exited with {p.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return p, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            raise SystemExit("server did not come up")
        time.sleep(0.5)


def build_folder(shape: str, tokenizer: str, out: Path, device: str, dtype: str, max_seq_len: int) -> Path:
    """A random-weight MPT (ALiBi, no biases) of `shape` as an HF folder with `tokenizer`."""
    import torch

    from smalto.hf import save_pretrained
    from smalto.model.config import MPTConfig
    from smalto.model.mpt import MPTForCausalLM
    from smalto.tokenizer import load_tokenizer

    if (out / "config.json").is_file():
        return out
    if Path(tokenizer).exists():
        tok = load_tokenizer(tokenizer)
    else:  # the load sends token ids: any tokenizer of the vocabulary's size will do (an id decodes as its number)
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {str(i): i for i in range(SHAPES[shape]["vocab_size"])}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="0"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="0")
        print(f"no tokenizer at {tokenizer}: a numbers-only one")
    cfg = MPTConfig.from_dict(
        {**SHAPES[shape], "max_seq_len": max_seq_len, "no_bias": True, "attn_config": {"alibi": True}}
    )
    model = MPTForCausalLM(cfg, device=device).to(getattr(torch, dtype)).eval()
    save_pretrained(model, out, tokenizer=tok)
    del model
    return out


def offline(folder: Path, work: list[tuple[list[int], int]], batch: int, device: str, dtype: str) -> dict:
    """`smalto.generate` on batches of `batch` prompts; output tokens/s counts each request's own length (a batch
    runs to its longest output: the shorter rows' extra tokens are not counted)."""
    import torch

    from smalto.generate import generate
    from smalto.load import load

    model = load(folder, dtype=dtype, device=device).eval()
    groups = [work[i : i + batch] for i in range(0, len(work), batch)]

    def steps(g: list[tuple[list[int], int]]) -> int:
        """A batch decodes until its longest output, within the context after its longest prompt."""
        return min(max(o for _, o in g), model.config.max_seq_len - max(len(p) for p, _ in g))

    def run(g: list[tuple[list[int], int]]) -> None:
        generate(model, None, [p for p, _ in g], max_new_tokens=steps(g), temperature=0, eos_token_id=[])

    wall, useful = 0.0, 0
    for g in groups:  # each group once untimed (its decoder, keyed by batch and cache length, compiled and
        run(g)  # captured), then timed: generate keeps one decoder per model
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(g)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall += time.perf_counter() - t0
        useful += sum(min(o, steps(g)) for _, o in g)
    return {"batch": batch, "output_tokens_per_s": useful / wall}


def plot(results: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        x = [r["output_tokens_per_s"] for r in rows]
        axes[0].plot(x, [r["ttft"]["p50"] * 1e3 for r in rows], "o-", label=name)
        axes[1].plot(x, [r["tpot"]["p50"] * 1e3 for r in rows], "o-", label=name)
    for ax, what in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)"), strict=True):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(
        f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} | {'TTFT p50/p90/p99 ms':>22} | {'after the burst':>22} | {'TPOT p50/p90/p99 ms':>22} | {'ITL p50/p90/p99 ms':>22}"
    )
    for r in rows:
        cols = [
            " ".join(f"{r[k][p] * 1e3:6.1f}" for p in ("p50", "p90", "p99"))
            for k in ("ttft", "ttft_steady", "tpot", "itl")
        ]
        print(
            f"{r['rate']:>6} {r['requests_per_s']:7.2f} {r['output_tokens_per_s']:10.1f} | {' | '.join(cols)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF folder to serve")
    ap.add_argument("--shape", choices=list(SHAPES), help="build a random-weight MPT of this shape instead")
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/tokenizers/gpt-neox-20b"))
    ap.add_argument("--workdir", default="/tmp/smalto-serve-load", help="where --shape writes its folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="smalto serve's --prefill-chunk (prompt tokens a step; default: the server's)",
    )
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rates", default="2,4,8,16,inf", help="requests/s, comma-separated; inf = all at once")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument(
        "--dataset",
        help="a JSONL of conversations (ShareGPT `conversations` or OpenAI `messages`) for the prompts and "
        "output lengths, instead of drawn lengths",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--baseline", action="store_true", help="also load the naive one-request-at-a-time server"
    )
    ap.add_argument(
        "--baseline-prompts",
        type=int,
        default=32,
        help="the naive server's share of the requests (it is slow)",
    )
    ap.add_argument("--baseline-rates", default="inf", help="the naive server's rates")
    ap.add_argument(
        "--no-smalto", action="store_true", help="skip smalto serve (e.g. to run the baseline alone)"
    )
    ap.add_argument("--offline", action="store_true", help="also time smalto.generate at --max-batch")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="tiny random model on CPU, a few requests")
    a = ap.parse_args()
    scale = 1.0
    if a.smoke:
        a.shape, a.device, a.dtype, a.max_batch, a.max_seq_len = "tiny", "cpu", "float32", 4, 128
        a.concurrency, a.num_prompts, a.rates, a.baseline, a.offline, scale = 4, 6, "4,inf", True, True, 0.05
    folder = (
        Path(a.model)
        if a.model
        else build_folder(a.shape, a.tokenizer, Path(a.workdir) / a.shape, a.device, a.dtype, a.max_seq_len)
    )
    rng = random.Random(a.seed)
    if a.dataset:
        from smalto.tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
        work = dataset_work(Path(a.dataset), tok, a.num_prompts, a.max_seq_len, rng)
        print(f"{len(work)} requests from {a.dataset}")
    else:
        work = [
            ([rng.randrange(1000, 30000) for _ in range(p)], o)
            for p, o in lengths(a.num_prompts, a.max_seq_len, rng, scale)
        ]
    rates = [float(r) for r in a.rates.split(",")]
    results: dict[str, list[dict]] = {}
    servers = {"smalto serve": [sys.executable, "-m", "smalto", "serve", str(folder), "--device", a.device,
                                "--dtype", a.dtype, "--max-batch", str(a.max_batch), "--max-seq-len", str(a.max_seq_len),
                                "--max-queue", str(max(256, a.num_prompts)), "--served-model-name", "m"]}  # fmt: skip
    if a.prefill_chunk is not None:
        servers["smalto serve"] += ["--prefill-chunk", str(a.prefill_chunk)]
    if a.baseline:
        servers["naive (transformers generate, one at a time)"] = [sys.executable, str(Path(__file__).with_name("serve_naive.py")), str(folder), "--device", a.device, "--dtype", a.dtype]  # fmt: skip
    for name, cmd in servers.items():
        naive = name.startswith("naive")
        if not naive and a.no_smalto:
            continue
        load = work[: a.baseline_prompts] if naive else work
        load_rates = [float(r) for r in a.baseline_rates.split(",")] if naive else rates
        proc, url = start(cmd)
        try:
            asyncio.run(run_load(url, load[: a.concurrency], math.inf, a.concurrency, a.seed))  # warm up
            results[name] = [asyncio.run(run_load(url, load, r, a.concurrency, a.seed)) for r in load_rates]
        finally:
            proc.terminate()
            proc.wait()
        table(name, results[name])
    report: dict[str, Any] = {"servers": results, "args": vars(a)}
    if a.offline:
        report["offline"] = offline(folder, work, a.max_batch, a.device, a.dtype)
        print(
            f"\noffline smalto.generate at batch {a.max_batch}: {report['offline']['output_tokens_per_s']:.1f} output tokens/s"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=1))
    plot(results, out / "serve_load.png")
    print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.png'}")


if __name__ == "__main__":
    main()
