"""Long-context inference: chunked prefill speed and memory, and decode speed at a long context, for MPT-7B.

    python bench/bench_long.py --device cuda        # MPT-7B, bf16: prefill 16k / 65k / 84k, decode at 84k
    python bench/bench_long.py --smoke              # a tiny model on CPU in fp32, to check the script runs

A random-weight model of the MPT-7B-StoryWriter shape (d_model 4096, 32 heads, 32 layers, vocab 50,432, ALiBi with
`alibi_bias_max 16`, `clip_qkv 6`, no biases), its `max_seq_len` raised to the longest prompt + `--new` (ALiBi runs
past the trained 65,536). For each prompt length, shortest first, `smalto generate`'s decoder (smalto.generate.
get_decoder) allocates a KV cache for that prompt + `--new` (+ 3) tokens only (the previous one freed first) and prefills
one row of random tokens in chunks of at most `--chunk` tokens (smalto.generate.prefill_spans): prefill tokens/s,
and the peak GPU memory of the prefill (weights + cache + what the chunks need). At the last (longest) prompt, the
decoder's step, compiled into a CUDA graph as `generate` runs it, is timed over `--new` steps after 3 warm-up
steps (the first compiles): decode ms/token at that context.
Results: a table, and `long.json` in $OUT when that variable is set (written after every measurement, so a run cut
short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from smalto.generate import PREFILL_CHUNK, get_decoder
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

SHAPES = {
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, vocab_size=512),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
}
GiB = 2**30
WARMUP = 3  # decode steps before the timed ones (the first compiles and captures the CUDA graph)


def build(shape: str, max_seq_len: int, device: str, dtype: torch.dtype) -> MPTForCausalLM:
    """Random weights, initialised where they live in `dtype` (no float32 copy of a 7B model first)."""
    attn = {"alibi": True, "alibi_bias_max": 16, "clip_qkv": 6}
    cfg = MPTConfig.from_dict(
        {**SHAPES[shape], "max_seq_len": max_seq_len, "no_bias": True, "attn_config": attn}
    )
    model = MPTForCausalLM(cfg, device="meta").to(dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@torch.inference_mode()
def prefill(
    model: MPTForCausalLM, n: int, new: int, chunk: int, compile: bool, device: str
) -> tuple[dict, object]:
    """Prefill one random n-token row; its figures and the decoder (its cache holds the prompt)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dec = get_decoder(model, 1, n + new + WARMUP, compile)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    mask = torch.ones(1, n, dtype=torch.bool, device=device)
    sync(device)
    t = time.perf_counter()
    logits = dec.prefill(ids, mask, chunk)
    sync(device)
    dt = time.perf_counter() - t
    cache_bytes = sum(x.numel() * x.element_size() for x in dec.cache.tensors())
    row = {
        "prompt_tokens": n,
        "cache_slots": dec.cache.max_len,
        "prefill_s": dt,
        "prefill_tokens_per_s": n / dt,
        "cache_gib": cache_bytes / GiB,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "first_token": int(logits.argmax(-1)[0]),
    }
    return row, dec


@torch.inference_mode()
def decode_ms(dec, first: int, start: int, steps: int, device: str) -> float:
    """ms per step of the decoder's (compiled) step, greedy from `first` at position `start` on."""
    token = torch.full((1, 1), first, dtype=torch.long, device=device)
    for i in range(WARMUP):
        token = dec.step(token, torch.full((1,), start + i, dtype=torch.long, device=device)).argmax(
            -1, keepdim=True
        )
    sync(device)
    t = time.perf_counter()
    for i in range(WARMUP, WARMUP + steps):
        token = dec.step(token, torch.full((1,), start + i, dtype=torch.long, device=device)).argmax(
            -1, keepdim=True
        )
    sync(device)
    return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--prompts", default="16384,65536,84000", help="prompt lengths, comma-separated")
    ap.add_argument("--new", type=int, default=64, help="cache room after the prompt, and decode steps timed")
    ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prefill tokens per forward, at most")
    ap.add_argument("--no-decode", action="store_true", help="prefill only")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on CPU in fp32")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.shape, args.prompts, args.new, args.chunk = "cpu", "tiny", "64,200", 8, 48
    lengths = sorted(int(n) for n in args.prompts.split(","))
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    model = build(args.shape, lengths[-1] + args.new + WARMUP, args.device, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    say(
        f"{args.shape}: {model.num_params() / 1e9:.2f}B parameters, {weights_gib:.1f} GiB in {dtype}, on {gpu}"
    )
    result: dict = {
        "shape": args.shape,
        "device": args.device,
        "gpu": gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "chunk": args.chunk,
        "weights_gib": weights_gib,
        "prefill": [],
    }
    out = os.environ.get("OUT")

    def save() -> None:
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, "long.json").write_text(json.dumps(result, indent=2))

    prefill(
        model, min(lengths[0], args.chunk), 1, args.chunk, cuda, args.device
    )  # warm-up: kernels, allocator
    dec = None
    for n in lengths:
        dec = None  # the previous cache goes before the next is allocated
        row, dec = prefill(model, n, args.new, args.chunk, cuda, args.device)
        result["prefill"].append(row)
        save()
        peak = f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
        say(
            f"prefill {n}: {row['prefill_tokens_per_s']:,.0f} tokens/s, cache {row['cache_gib']:.1f} GiB{peak}"
        )
    if not args.no_decode and dec is not None:
        last = result["prefill"][-1]
        ms = decode_ms(dec, last["first_token"], lengths[-1], args.new, args.device)
        result["decode"] = {"context": lengths[-1], "steps": args.new, "ms_per_token": ms, "compiled": cuda}
        save()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"long-context inference, {args.shape} {result['dtype']}, chunk {args.chunk} ({gpu})")
    for col in (
        "prompt tokens",
        "prefill s",
        "prefill tokens/s",
        "KV cache GiB",
        "peak GiB",
        "peak - weights - cache",
    ):
        table.add_column(col, justify="right")
    for r in result["prefill"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        extra = f"{r['peak_gib'] - weights_gib - r['cache_gib']:.1f}" if r["peak_gib"] is not None else "-"
        table.add_row(
            f"{r['prompt_tokens']:,}",
            f"{r['prefill_s']:.2f}",
            f"{r['prefill_tokens_per_s']:,.0f}",
            f"{r['cache_gib']:.1f}",
            peak,
            extra,
        )
    Console(width=160).print(table)
    if "decode" in result:
        d = result["decode"]
        mode = "CUDA graph" if d["compiled"] else "eager"
        print(f"decode at {d['context']:,} tokens of context: {d['ms_per_token']:.2f} ms/token ({mode})")


if __name__ == "__main__":
    main()
