"""Training throughput of the real training step: tokens/s, MFU (llm-foundry's formula) and peak memory.

Builds each recipe's step with `smalto.train.setup.build_trainer`, as `smalto train` does (attention plan, meta
device → kernels → per-block compile → materialise, bf16 autocast, LION), and times `smalto.train.loop.train_step`
on random tokens (data loading is not measured), for several micro-batch sizes. One process; run it under torchrun
to measure FSDP2.

    python bench/bench_train.py --device cuda                                  # MPT-125M and MPT-1B, seq 2048
    python bench/bench_train.py --device cuda --models mpt-7b --micro-batches 1,2 --ac   # 7B on one GPU
    python bench/bench_train.py --smoke                                        # CPU, tiny shapes: does it run?
    python bench/bench_train.py --device cuda --models mpt-1b,llama-1b --micro-batches 8,16
                                   # a 1B Llama shape (TinyLlama-1.1B: RoPE, GQA, SwiGLU) beside MPT-1B
    python bench/bench_train.py --device cuda --models mpt-1b --micro-batches 16 --accum 4 --profile
                                   # and where one step's GPU time goes (kernel categories, top kernels)
    python bench/bench_train.py --device cuda --models mpt-1b --micro-batches 16 --accum 4 --gelu exact,poly
                                   # the MLP's GELU as shipped (polynomial erf, smalto/kernels/gelu.py) and F.gelu
    torchrun --nproc_per_node 2 bench/bench_train.py --models mpt-1b --micro-batches 16 --accum 4 --grad-sync micro_batch,step
                                   # FSDP2: gradients reduce-scattered per micro-batch (default) or once per step;
                                   # --no-reshard-after-forward keeps gathered parameters for the backward (ZeRO-2)
    python bench/bench_train.py --device cuda --models mpt-1b --micro-batches 16 --accum 32 --weight-cast step,micro_batch
                                   # bf16 weights made once per step (shipped) or autocast's casts per forward
    python bench/bench_train.py --device cuda --models mpt-1b --micro-batches 16 --accum 4 --loss chunked,full
                                   # the loss a chunk of tokens at a time or from the full logits
    python bench/bench_train.py --device cuda --models mpt-7b-storywriter --micro-batches 1 --ac --loss chunked --steps 2 --warmup 1
                                   # MPT-7B at 65,536 tokens under the storywriter recipe (offload, chunked loss)
    python bench/bench_train.py --device cuda --models mpt-7b-storywriter --micro-batches 1 --ac --loss chunked --set optimizer.offload=none
                                   # --set KEY=VALUE: any recipe setting (repeatable); here the cost of offloading
    python bench/bench_train.py --device cuda --models mpt-1b --seq 65536,131072 --micro-batches 1 --ac --loss chunked
                                   # several sequence lengths

MFU = tokens/s per device × (6·N + 12·n_layers·d_model·seq) / the device's bf16 dense peak FLOP/s (as training
looks it up; --peak-tflops overrides).
Results: a rich table, and bench_train.json in $OUT when set.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from smalto.config import load_config
from smalto.errors import UserError
from smalto.kernels.gelu import PolyGELU
from smalto.model.layers import Activation
from smalto.train.loop import train_step
from smalto.train.parallel import close_world, init_world
from smalto.train.setup import build_trainer

CATEGORIES = [  # a kernel's category: the first whose words its name contains
    ("attention", ("flex", "attention", "fmha", "flash", "sdpa", "cudnn")),
    ("gemm", ("gemm", "sm90", "cutlass", "cublas", "nvjet", "matmul", "xmma")),
    ("optimizer", ("foreach", "multi_tensor")),
    ("loss", ("nll", "log_softmax", "cross_entropy")),
    ("triton-fused", ("triton",)),  # inductor's kernels: norms, GELU, residual adds, casts
    ("copy/cast", ("copy", "cast", "to_copy")),
]


def category(kernel: str) -> str:
    low = kernel.lower()
    return next((cat for cat, words in CATEGORIES if any(w in low for w in words)), "other")


def print_profile(step, title: str, trace: str, top: int = 30) -> None:
    """One more step under torch.profiler: GPU kernel time by category and the top kernels; the Chrome trace in
    $OUT when set."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_cat: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.device_time_total
        if us > 0:
            cat = category(evt.key)
            by_cat[cat] = by_cat.get(cat, 0.0) + us
            by_name[evt.key] = by_name.get(evt.key, 0.0) + us
    total = sum(by_cat.values())
    print(f"{title}: GPU kernel time in one step {total / 1e3:.1f} ms")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:14s} {us / 1e3:9.1f} ms  {100 * us / total:5.1f}%")
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e3:9.2f} ms  {name[:120]}")
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, f"trace_{trace}.json"))


# Llama-shape models: a shipped recipe's training setup (optimizer, precision, sequence) with the model replaced by
# a LLaMA architecture. llama-1b is TinyLlama-1.1B's config.json (d 2048, 32 heads / 4 key-value heads, 22 layers,
# SwiGLU 5632, vocab 32000, untied head, RoPE θ 10000, RMSNorm).
LLAMA_MODELS = {
    "llama-1b": (
        "mpt-1b",
        [
            "model.d_model=2048",
            "model.n_heads=32",
            "model.n_layers=22",
            "model.vocab_size=32000",
            "model.no_bias=true",
            "model.norm_type=rmsnorm",
            "model.norm_eps=1e-5",
            "model.tie_word_embeddings=false",
            "model.attn_config={alibi: false, rope: true, rope_theta: 10000.0, kv_n_heads: 4}",
            "model.ffn_config={ffn_type: mptglu, ffn_hidden_size: 5632, ffn_act_fn: {name: silu}}",
        ],
    ),
}


def bench_one(
    recipe: str,
    micro: int,
    attn: str,
    gelu: str,
    grad_sync: str,
    weight_cast: str,
    loss: str,
    seq: int | None,
    args: argparse.Namespace,
    world,
) -> dict:
    recipe_file, model_overrides = LLAMA_MODELS.get(recipe, (recipe, []))
    overrides = [
        *model_overrides,
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro * args.accum * world.world_size}",
        f"train.compile={str(args.compile).lower()}",
        f"train.activation_checkpointing={str(args.ac).lower()}",
        f"model.attn_config.attn_impl={attn}",
        f"train.grad_sync={grad_sync}",
        f"train.weight_cast={weight_cast}",
        f"train.loss={loss}",
        f"train.reshard_after_forward={str(args.reshard_after_forward).lower()}",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    if seq:
        overrides += [f"model.max_seq_len={seq}", f"data.seq_len={seq}"]
    overrides += args.set
    if args.smoke:
        overrides += [
            "model.d_model=64",
            "model.n_heads=4",
            "model.n_layers=2",
            "model.vocab_size=512",
            "model.max_seq_len=64",
            "data.seq_len=64",
            "train.precision=fp32",
        ]
    if args.peak_tflops is not None:
        overrides.append(f"train.peak_tflops={args.peak_tflops}")
    cfg = load_config(recipe_file, overrides)
    seq = cfg.data.seq_len
    t = build_trainer(cfg, world)
    t.logger.enabled = False  # no run folder: the table is the output
    if gelu == "exact":  # F.gelu in training too, for an A/B against the polynomial
        for m in t.model.modules():
            if isinstance(getattr(m, "act", None), PolyGELU):
                m.act = Activation("gelu")
    gen = torch.Generator().manual_seed(0)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, cfg.model.vocab_size, (micro, seq), generator=gen)
        return {"input_ids": ids, "labels": ids, "sequence_id": torch.zeros_like(ids)}

    batches = [batch() for _ in range(args.accum)]
    sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        train_step(t, batches)
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(t, batches)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if args.profile and world.device.type == "cuda":
        print_profile(
            functools.partial(train_step, t, batches),
            f"{recipe} micro {micro} × {args.accum}, {attn}, {gelu} GELU",
            trace=f"{recipe}_{micro}x{args.accum}_{attn}_{gelu}",  # one trace per row
        )
    tps = t.tokens_per_step / seconds
    peak = t.peak_tflops
    row = {
        "recipe": recipe,
        "params_M": round(cfg.model.num_params() / 1e6, 1),
        "seq": seq,
        "micro_batch": micro,
        "accum": args.accum,
        "world_size": world.world_size,
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_device": round(tps / world.world_size, 1),
        "mfu": round(tps / world.world_size * t.flops_per_token / (peak * 1e12), 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if world.device.type == "cuda"
        else None,
        "loss_last": round(t.losses[-1], 4),
        "compile": args.compile,
        "ac": args.ac,
        "reshard_after_forward": args.reshard_after_forward,
        "attn": f"{attn}→{t.attention.kernel.name}" if attn in ("auto", "cudnn") else attn,
        "gelu": gelu,
        "grad_sync": grad_sync,
        "weight_cast": weight_cast,
        "loss": loss,
    }
    del t
    gc.collect()
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="mpt-125m,mpt-1b")
    p.add_argument("--micro-batches", default="4,8,16")
    p.add_argument(
        "--seq", default=None, help="override the recipe's sequence length; comma-separated for several"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any recipe override, as `smalto train` takes it (repeatable), e.g. optimizer.offload=none",
    )
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument(
        "--attn",
        default="auto",
        help="attn_impl values to time, comma-separated: auto (shipped), cudnn, flex, sdpa",
    )
    p.add_argument(
        "--gelu",
        default="poly",
        help="the MLP's GELU in training, comma-separated: poly (shipped: erf as a polynomial, smalto/kernels/gelu.py), "
        "exact (F.gelu)",
    )
    p.add_argument(
        "--grad-sync",
        default="micro_batch",
        help="train.grad_sync values under torchrun with --accum > 1, comma-separated: micro_batch (default), step",
    )
    p.add_argument(
        "--weight-cast",
        default="step",
        help="train.weight_cast values on one device, comma-separated: step (default: bf16 weights made once per "
        "step), micro_batch (autocast's casts in every forward)",
    )
    p.add_argument(
        "--loss",
        default="auto",
        help="train.loss values, comma-separated: auto (default: full up to 8 GiB of logits a micro-batch), chunked "
        "(the head and cross-entropy a chunk of tokens at a time), full (the full logits, then a fused cross-entropy)",
    )
    p.add_argument(
        "--reshard-after-forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FSDP2 under torchrun: free gathered parameters after the forward (ZeRO-3, default) or keep them (ZeRO-2)",
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ac", action="store_true", help="activation checkpointing on every block")
    p.add_argument(
        "--profile", action="store_true", help="profile one more step per row: kernel time by category (CUDA)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="bf16 dense peak of the device (default: looked up)"
    )
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 steps: check that it runs")
    args = p.parse_args()
    if bad := set(args.gelu.split(",")) - {"exact", "poly"}:
        p.error(f"--gelu {sorted(bad)}: choose from exact, poly")
    if bad := set(args.grad_sync.split(",")) - {"micro_batch", "step"}:
        p.error(f"--grad-sync {sorted(bad)}: choose from micro_batch, step")
    if bad := set(args.weight_cast.split(",")) - {"micro_batch", "step"}:
        p.error(f"--weight-cast {sorted(bad)}: choose from step, micro_batch")
    if bad := set(args.loss.split(",")) - {"auto", "chunked", "full"}:
        p.error(f"--loss {sorted(bad)}: choose from auto, chunked, full")
    if args.smoke:
        args.device, args.models, args.micro_batches = "cpu", "mpt-125m,llama-1b", "2"
        args.steps, args.warmup, args.attn, args.compile = 2, 1, "sdpa", False
    torch.backends.cuda.matmul.allow_tf32 = True
    world = init_world(args.device)
    console = Console(width=160)  # the whole table also when captured to a file
    rows = []
    try:
        for recipe in args.models.split(","):
            for seq, micro, attn, gelu, sync, cast, loss in itertools.product(
                [int(s) for s in args.seq.split(",")] if args.seq else [None],
                [int(m) for m in args.micro_batches.split(",")],
                args.attn.split(","),
                args.gelu.split(","),
                args.grad_sync.split(","),
                args.weight_cast.split(","),
                args.loss.split(","),
            ):
                try:
                    rows.append(bench_one(recipe, micro, attn, gelu, sync, cast, loss, seq, args, world))
                except UserError as e:  # out of memory: say so and go on with the next size
                    rows.append(
                        {
                            "recipe": recipe,
                            "seq": seq,
                            "micro_batch": micro,
                            "attn": attn,
                            "gelu": gelu,
                            "grad_sync": sync,
                            "weight_cast": cast,
                            "loss": loss,
                            "error": str(e)[:80],
                        }
                    )
                    gc.collect()
                    if world.device.type == "cuda":
                        torch.cuda.empty_cache()
                console.print(rows[-1])
    finally:
        close_world(world)
    if not world.is_main:
        return
    table = Table(
        title=f"smalto train step ({torch.cuda.get_device_name() if world.device.type == 'cuda' else 'cpu'})"
    )
    cols = [
        "recipe",
        "params_M",
        "seq",
        "micro_batch",
        "accum",
        "attn",
        "gelu",
        "grad_sync",
        "weight_cast",
        "loss",
        "tokens_per_s_per_device",
        "mfu",
        "peak_mem_gib",
        "step_s",
    ]
    for c in cols:
        table.add_column(c)
    for r in rows:
        if "error" in r:
            table.add_row(
                r["recipe"],
                "",
                str(r["seq"] or ""),
                str(r["micro_batch"]),
                "",
                r["attn"],
                r["gelu"],
                r["grad_sync"],
                r["weight_cast"],
                r["loss"],
                r["error"],
                "",
                "",
                "",
            )
            continue
        table.add_row(*[f"{100 * r[c]:.1f}%" if c == "mfu" and r[c] is not None else str(r[c]) for c in cols])
    console.print(table)
    out = os.environ.get("OUT")
    if out:
        info = {"torch": torch.__version__, "device": str(world.device), "args": vars(args), "results": rows}
        Path(out, "bench_train.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
