"""Training-step throughput of the MPT model per attention kernel, against transformers' MptForCausalLM.

One step = forward + backward + AdamW (fused) under bf16 autocast with float32 master weights, the same for every
row. MFU uses llm-foundry's formula: flops/token = 6·N + 12·n_layers·d_model·seq, peak 989 TFLOP/s (H100/H200 bf16).
A smalto row's impl is its `attn_impl` (flex, sdpa, eager, cudnn, auto); the training plan `smalto.kernels.select`
makes for it at the row's micro-batch is applied as training applies it, with the polynomial GELU under bf16
(smalto/train/parallel.py); the table names the kernel each ran.

    python bench/bench_model.py --device cuda                      # 125m and 1b, every kernel, seq 2048
    python bench/bench_model.py --smoke                            # tiny shapes on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import torch

from smalto.errors import ConfigError
from smalto.kernels import apply, select
from smalto.kernels.gelu import use_poly_gelu
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM, causal_lm_loss

SHAPES = {  # llm-foundry's mpt-125m / mpt-1b yamls (d_model, n_heads, n_layers)
    "tiny": (64, 4, 2),
    "125m": (768, 12, 12),
    "1b": (2048, 16, 24),
}
# micro-batch per (shape, impl): the largest that fits an 80 GB H100 without activation checkpointing
MICRO_BATCH = {
    ("125m", "flex"): 32,
    ("125m", "sdpa"): 16,
    ("125m", "eager"): 4,
    ("125m", "hf"): 4,
    ("1b", "flex"): 12,
    ("1b", "sdpa"): 8,
    ("1b", "eager"): 2,
    ("1b", "hf"): 2,
}


def build(shape: str, impl: str, seq: int, vocab: int, device: str, micro_batch: int) -> torch.nn.Module:
    """transformers' model for impl "hf"; else smalto's, with the training plan and GELU a bf16 run takes."""
    d, h, n = SHAPES[shape]
    shape_kw: dict[str, Any] = dict(
        d_model=d, n_heads=h, n_layers=n, max_seq_len=seq, vocab_size=vocab, no_bias=True
    )
    if impl == "hf":
        import transformers

        cfg = transformers.MptConfig(**shape_kw, attn_config={"alibi": True, "alibi_bias_max": 8})
        with torch.device(device):
            return transformers.MptForCausalLM(cfg)
    config = MPTConfig.from_dict({**shape_kw, "attn_config": {"alibi": True, "attn_impl": impl}})
    model = MPTForCausalLM(config, device=device)
    bf16 = device == "cuda"  # the step's autocast (make_step)
    dtype = torch.bfloat16 if bf16 else torch.float32
    plan = select(config, "train", device=torch.device(device), dtype=dtype, batch=micro_batch, seq=seq)
    apply(model, {"train": plan})
    if bf16:
        use_poly_gelu(model)
    return model


def make_step(model, impl: str, compile_mode: str, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    mode = os.environ.get("BENCH_COMPILE_MODE")  # e.g. max-autotune-no-cudagraphs
    if impl != "hf" and compile_mode == "block" and device == "cuda":
        for block in model.transformer.blocks:
            block.compile(mode=mode)
    fwd = model
    if compile_mode == "model" and device == "cuda":
        fwd = torch.compile(model, mode=mode)

    def step(x):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if impl == "hf":
                loss = fwd(input_ids=x, labels=x).loss
            else:
                h = model.transformer(x) if compile_mode != "model" else None
                loss = causal_lm_loss(model.unembed(h), x) if h is not None else fwd(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run(shape: str, impl: str, args) -> dict:
    device, seq = args.device, args.seq
    mb = args.micro_batch or MICRO_BATCH.get((shape, impl), 2)
    torch.manual_seed(0)
    row = {"shape": shape, "impl": impl, "micro_batch": mb, "seq": seq, "compile": args.compile}
    try:
        model = build(shape, impl, seq, args.vocab, device, mb).train()
        if isinstance(model, MPTForCausalLM):
            row["attention"] = model.transformer.plans["train"].name
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        d, _, n = SHAPES[shape]
        flops_per_token = 6 * n_params + 12 * n * d * seq
        step = make_step(model, impl, args.compile if impl != "hf" else "none", device)
        x = torch.randint(0, args.vocab, (mb, seq), device=device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step(x)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(x)
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        tps = mb * seq / dt
        row.update(
            params=n_params,
            step_ms=dt * 1e3,
            tokens_per_s=tps,
            mfu=tps * flops_per_token / (args.peak_tflops * 1e12),
            loss=float(loss.detach()),
            peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        )
    except torch.OutOfMemoryError:
        row.update(error="OOM")
    except ConfigError as e:  # an attn_impl that cannot train here (flex on CPU, cudnn without the package)
        row.update(error=f"ConfigError: {e}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="125m,1b")
    p.add_argument(
        "--impls",
        default="flex,sdpa,eager,hf",
        help="attn_impl values (also cudnn, auto), and hf: transformers",
    )
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=50432)
    p.add_argument("--micro-batch", type=int, default=0, help="0 = the per-shape default")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", choices=["block", "model", "none"], default="block")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    args = p.parse_args()
    if args.smoke:
        args.device, args.shapes, args.seq, args.vocab, args.steps, args.warmup = "cpu", "tiny", 64, 256, 2, 1
        args.impls = "sdpa,eager,hf"
        args.micro_batch = 2
    torch.backends.cuda.matmul.allow_tf32 = True

    rows = [run(s, i, args) for s in args.shapes.split(",") for i in args.impls.split(",")]
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"training step, bf16, seq {args.seq}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}"
    )
    for col in (
        "shape",
        "impl",
        "attention",
        "micro-batch",
        "step ms",
        "tokens/s",
        "MFU",
        "peak GB",
        "vs hf",
    ):
        table.add_column(col, justify="right")
    hf = {r["shape"]: r.get("tokens_per_s") for r in rows if r["impl"] == "hf"}
    for r in rows:
        if "error" in r:
            row = [r["shape"], r["impl"], r.get("attention", ""), str(r["micro_batch"]), r["error"]]
            table.add_row(*row, "", "", "", "")
            continue
        ratio = f"{r['tokens_per_s'] / hf[r['shape']]:.2f}×" if hf.get(r["shape"]) else ""
        table.add_row(
            r["shape"],
            r["impl"],
            r.get("attention", ""),
            str(r["micro_batch"]),
            f"{r['step_ms']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{100 * r['mfu']:.1f}%",
            f"{r['peak_mem_gb']:.1f}",
            ratio,
        )
    Console(width=160).print(table)
    out = os.environ.get("OUT")
    if out:
        meta = {"date": datetime.now(UTC).isoformat(), "torch": torch.__version__, "args": vars(args)}
        with open(os.path.join(out, "bench_model.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
