"""Full finetuning on one GPU: peak memory, real tokens/s and MFU per optimizer-memory choice, with and without packing.

Builds the step as `smalto finetune` does (`smalto.train.setup.build_trainer` on the recipe's shapes, bf16, the
attention plan with sequence ids) and times `smalto.train.loop.train_step` on synthetic finetuning rows whose
examples follow a Dolly-like length mix (most 100–600 tokens, a third of each the prompt, labels -100 there).
Packed rows hold several examples (sequence ids keep them apart); unpacked rows hold one, padded. "real tokens/s"
counts tokens that are not padding; MFU is computed on them.

    python bench/bench_finetune.py --device cuda                     # MPT-7B, seq 2048: every optimizer choice
    python bench/bench_finetune.py --device cuda --optimizers adamw-bf16 --micro-batches 1,2,4 --packing on,off
    python bench/bench_finetune.py --smoke                           # CPU, tiny shapes: does it run?

Optimizer choices: `adamw` (float32 moments, 8 bytes a parameter), `adamw-bf16` (optimizer.state_dtype=bf16,
4 bytes), `lion` (one float32 moment, 4 bytes), `adamw-offload` and `adamw-bf16-offload` (optimizer.offload=cpu:
the moments in CPU memory, streamed through the GPU at each step; 0 bytes on the GPU). Results: a rich table, and bench_finetune.json in $OUT when set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from smalto.config import load_config
from smalto.data.finetune import pack
from smalto.errors import UserError
from smalto.train.loop import train_step
from smalto.train.parallel import close_world, init_world
from smalto.train.setup import build_trainer

OPTIMIZERS = {
    "adamw": ["optimizer.name=adamw", "optimizer.betas=[0.9,0.999]", "optimizer.state_dtype=fp32"],
    "adamw-bf16": ["optimizer.name=adamw", "optimizer.betas=[0.9,0.999]", "optimizer.state_dtype=bf16"],
    "lion": ["optimizer.name=lion", "optimizer.state_dtype=fp32"],
    "adamw-offload": [
        "optimizer.name=adamw",
        "optimizer.betas=[0.9,0.999]",
        "optimizer.state_dtype=fp32",
        "optimizer.offload=cpu",
    ],
    "adamw-bf16-offload": [
        "optimizer.name=adamw",
        "optimizer.betas=[0.9,0.999]",
        "optimizer.state_dtype=bf16",
        "optimizer.offload=cpu",
    ],
}


def dolly_like_lengths(n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """Example lengths: log-normal around sqrt(lo·hi) tokens, most in [lo, hi], clipped to [lo // 4, 2 * hi]."""
    return np.clip(rng.lognormal(np.log(np.sqrt(lo * hi)), 0.45, n), lo // 4, 2 * hi).astype(np.int64)


def rows(lengths: np.ndarray, seq: int, vocab: int, packing: bool, rng: np.random.Generator) -> list[dict]:
    examples = []
    for n in np.minimum(lengths, seq):
        ids = rng.integers(1, vocab, n)
        labels = ids.copy()
        labels[: n // 3] = -100  # the prompt
        examples.append((ids, labels))
    groups = pack(examples, seq) if packing else [[i] for i in range(len(examples))]
    out = []
    for g in groups:
        ids, labels, sid = np.zeros(seq, np.int64), np.full(seq, -100), np.full(seq, -1)
        at = 0
        for k, e in enumerate(g):
            e_ids, e_labels = examples[e]
            ids[at : at + len(e_ids)], labels[at : at + len(e_ids)], sid[at : at + len(e_ids)] = (
                e_ids,
                e_labels,
                k,
            )
            at += len(e_ids)
        out.append({"input_ids": ids, "labels": labels, "sequence_id": sid})
    return out


def batches(all_rows: list[dict], micro: int) -> list[dict[str, torch.Tensor]]:
    return [
        {k: torch.from_numpy(np.stack([r[k] for r in all_rows[i : i + micro]])) for k in all_rows[0]}
        for i in range(0, len(all_rows) - micro + 1, micro)
    ]


def bench_one(opt: str, packing: bool, micro: int, args: argparse.Namespace, world) -> dict:
    overrides = [
        *OPTIMIZERS[opt],
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro * args.accum}",
        f"train.activation_checkpointing={str(args.ac).lower()}",
        f"train.compile={str(args.compile).lower()}",
        "model.attn_config.attn_uses_sequence_id=true",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    if args.seq:
        overrides += [f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}"]
    if args.smoke:
        overrides += ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.vocab_size=512"]
        overrides += [
            "model.max_seq_len=256",
            "data.seq_len=256",
            "train.precision=fp32",
            "train.compile=false",
        ]
    cfg = load_config(args.recipe, overrides)
    seq = cfg.data.seq_len
    rng = np.random.default_rng(0)
    lengths = dolly_like_lengths(4096, args.min_len, args.max_len, rng)
    data = batches(rows(lengths, seq, cfg.model.vocab_size, packing, rng), micro)
    row = {"optimizer": opt, "packing": packing, "micro": micro, "seq": seq}
    t = None
    try:
        t = build_trainer(cfg, world)
        t.logger.enabled = False
        opt_seconds = time_optimizer_steps(t.optimizer, world.device)
        if world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = args.warmup + args.steps
        if len(data) < steps * t.accum:
            raise SystemExit(f"only {len(data)} micro-batches for {steps} steps; lower --steps")
        real = 0
        for s in range(steps):
            if s == args.warmup:
                if world.device.type == "cuda":
                    torch.cuda.synchronize()
                start, real = time.perf_counter(), 0
                opt_seconds.clear()
            mbs = data[s * t.accum : (s + 1) * t.accum]
            train_step(t, mbs)
            real += sum(int((mb["sequence_id"] >= 0).sum()) for mb in mbs)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tps = real / seconds
        peak = torch.cuda.max_memory_allocated() / 2**30 if world.device.type == "cuda" else float("nan")
        mfu = tps * t.flops_per_token / (t.peak_tflops * 1e12) if t.peak_tflops else None
        fill = real / (args.steps * t.accum * micro * seq)
        row.update(
            peak_gib=peak, real_tokens_per_s=tps, mfu=mfu, fill=fill, optimizer_s=float(np.mean(opt_seconds))
        )
    except UserError as e:  # out of memory: train_step says so
        row.update(error=str(e).split(";")[0])
    finally:
        del t
        gc.collect()
        if world.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def time_optimizer_steps(optimizer: torch.optim.Optimizer, device: torch.device) -> list[float]:
    """Seconds of each `optimizer.step()` from now on (the device synchronised around it), in the list returned."""
    seconds: list[float] = []
    step = optimizer.step

    def timed(*a, **k):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = step(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        return out

    optimizer.step = timed  # type: ignore[method-assign]
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="mpt-7b", help="pretraining recipe whose model shapes to use")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--packing", default="on,off")
    ap.add_argument("--micro-batches", default="2")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=600)
    ap.add_argument(
        "--ac", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing"
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-block compile (the recipes' default)",
    )
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 steps: does it run?")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.steps, args.warmup, args.accum = "cpu", 2, 1, 1
        args.min_len, args.max_len = 12, 72  # the same mix scaled to the smoke's 256-token rows
    world = init_world(args.device)
    results = []
    try:
        for opt in args.optimizers.split(","):
            for packing in (p == "on" for p in args.packing.split(",")):
                for micro in (int(m) for m in args.micro_batches.split(",")):
                    results.append(bench_one(opt, packing, micro, args, world))
    finally:
        close_world(world)
    table = Table(
        title=f"full finetuning, {args.recipe} shapes, {args.device}, length mix {args.min_len}–{args.max_len}"
    )
    for col in (
        "optimizer",
        "packing",
        "micro",
        "seq",
        "peak GiB",
        "real tok/s",
        "MFU",
        "rows filled",
        "opt. step s",
    ):
        table.add_column(col)
    for r in results:
        if "error" in r:
            table.add_row(
                r["optimizer"], str(r["packing"]), str(r["micro"]), str(r["seq"]), r["error"], "", "", "", ""
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        table.add_row(
            r["optimizer"], str(r["packing"]), str(r["micro"]), str(r["seq"]), f"{r['peak_gib']:.1f}",
            f"{r['real_tokens_per_s']:,.0f}", mfu, f"{100 * r['fill']:.0f}%", f"{r['optimizer_s']:.2f}",
        )  # fmt: skip
    Console().print(table)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_finetune.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
