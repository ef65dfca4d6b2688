"""QLoRA on one GPU: peak memory and step time of MPT-7B and MPT-30B with an NF4 base, LoRA r 16 on all four
projections, seq 2048, micro-batch 1, activation checkpointing on every block, bf16 autocast.

The base is random (the weights' values do not change memory or time) and never exists in 16 bits on the GPU:
the model is built on the meta device, then each block is materialised on the GPU, initialised, and its linear
layers turned into `NF4Linear`s before the next block exists (peak while building: one 16-bit block). The
embedding, norms and head stay bf16, frozen. Adapters: float32 A (Kaiming-uniform) and B (zero), AdamW on them only.
The step is the trainer's: the attention plan `smalto.kernels.select` picks for training, the loss from the hidden
states (`head_loss_for`), `parallelize` (kernels → activation checkpointing → compile), then forward, backward,
optimizer step.

    python bench/bench_qlora.py --device cuda                        # mpt-7b and mpt-30b
    python bench/bench_qlora.py --device cuda --models mpt-30b --compile
    python bench/bench_qlora.py --smoke                              # CPU, tiny shapes: does it run?

Targets (issue 24): MPT-7B peak ≤ 12 GiB; MPT-30B peak < 22 GiB. Results: a rich table, and bench_qlora.json in
$OUT when set. Peak = torch.cuda.max_memory_allocated over building and the timed steps (reserved shown beside it).

Adapters: smalto's LoRA (smalto/adapters/lora.py) on the NF4 layers, as `lora.base_dtype: nf4` in a recipe.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from smalto.adapters.lora import LoraConfig, adapters, apply_lora
from smalto.adapters.nf4 import NF4Linear
from smalto.kernels import select
from smalto.kernels.loss import head_loss_for
from smalto.model.config import MPTConfig
from smalto.model.init import init_weights
from smalto.model.mpt import MPTForCausalLM
from smalto.train.parallel import World, parallelize

# mosaicml/mpt-7b and mpt-30b config.json shapes (ALiBi, no biases, tied embedding, vocab 50432)
SHAPES = {
    "mpt-7b": {"d_model": 4096, "n_heads": 32, "n_layers": 32, "max_seq_len": 2048},
    "mpt-30b": {"d_model": 7168, "n_heads": 64, "n_layers": 48, "max_seq_len": 8192},
    "tiny": {"d_model": 128, "n_heads": 4, "n_layers": 2, "max_seq_len": 128},
}
TARGETS = ("Wqkv", "out_proj", "up_proj", "down_proj")


def mpt_config(name: str, attn_impl: str) -> MPTConfig:
    return MPTConfig.from_dict(
        {
            **SHAPES[name],
            "vocab_size": 50432 if name != "tiny" else 512,
            "expansion_ratio": 4,
            "no_bias": True,
            "attn_config": {"alibi": True, "attn_impl": attn_impl},
        }
    )


def build_nf4_model(config: MPTConfig, device: torch.device) -> MPTForCausalLM:
    """Random MPT with an NF4 base, built block by block on `device` (no 16-bit copy of the whole model)."""
    model = MPTForCausalLM(config, device="meta")
    blocks = model.transformer.blocks
    for block in blocks:
        block.to_empty(device=device)
        init_weights(block, config)
        block.to(torch.bfloat16)
        for name, lin in list(block.named_modules()):
            if type(lin) is nn.Linear:
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent), attr, NF4Linear.from_linear(lin))
        for p in block.parameters():
            p.requires_grad_(False)
    rest = [m for n, m in model.named_children() if n != "transformer"]
    rest += [m for n, m in model.transformer.named_children() if n != "blocks"]
    for m in rest:
        m.to_empty(device=device)
        init_weights(m, config)
        m.to(torch.bfloat16)
        for p in m.parameters():
            p.requires_grad_(False)
    return model


def attach_lora(model: MPTForCausalLM, r: int, alpha: float) -> list[nn.Parameter]:
    """smalto's LoRA (smalto.adapters.lora, PEFT's layer) on the four projections of every block, over the NF4
    base; returns the trainable parameters."""
    apply_lora(model, LoraConfig(r=r, alpha=alpha, targets=list(TARGETS)))
    return [p for p in model.parameters() if p.requires_grad]


def bench_one(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    seq, micro = args.seq, 1
    config = mpt_config(name, args.attn_impl)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_nf4_model(config, device)
    build_s = time.perf_counter() - t0
    nf4_gib = sum(m.storage_bytes() for m in model.modules() if isinstance(m, NF4Linear)) / 2**30
    params = attach_lora(model, args.r, args.alpha)
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    plans = {
        "train": select(config, "train", device=device, dtype=dtype, batch=micro, seq=seq),
        "score": select(config, "score", device=device, dtype=dtype, batch=micro, seq=seq),
    }
    parallelize(
        model,
        world,
        plans=plans,
        head_loss=head_loss_for("auto", micro * seq, config.vocab_size),
        activation_checkpointing=True,
        compile=args.compile,
        bf16=True,
    )
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4, fused=on_cuda)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (micro, seq), generator=g).to(device)
    times: list[float] = []
    loss = torch.zeros(())
    for step in range(args.warmup + args.steps):
        if on_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    row = {
        "model": name,
        "seq": seq,
        "micro_batch": micro,
        "lora_r": args.r,
        "compile": args.compile,
        "attention": plans["train"].name,
        "nf4_weights_gib": nf4_gib,
        "trainable_params": sum(p.numel() for p in params),
        "build_s": build_s,
        "step_s": step_s,
        "tokens_per_s": micro * seq / step_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan"),
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_cuda else float("nan"),
        "loss": float(loss.detach()),
        # the gradient reached every adapter through the NF4 layers and the recomputed blocks
        "adapters_trained": all(bool(m.lora_B.weight.detach().abs().sum() > 0) for m in adapters(model)),
    }
    del model, opt, params, loss
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mpt-7b,mpt-30b", help="comma-separated: mpt-7b, mpt-30b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument(
        "--attn-impl", default="auto", help="the model's attn_impl (the kernel `select` resolves)"
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (as train.compile)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny model, 1 step: does it run?")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.device, args.seq, args.warmup, args.steps = "tiny", "cpu", 64, 0, 1
        args.attn_impl = "sdpa"
    device = torch.device(args.device)
    rows = [bench_one(m.strip(), args, device) for m in args.models.split(",")]
    table = Table(title=f"QLoRA (NF4 base, LoRA r {args.r} on {'/'.join(TARGETS)}), activation checkpointing")
    for col in ("model", "seq×mb", "NF4 GiB", "trainable", "peak GiB", "reserved GiB", "step s", "tok/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['seq']}×{r['micro_batch']}",
            f"{r['nf4_weights_gib']:.2f}",
            f"{r['trainable_params'] / 1e6:.1f}M",
            f"{r['peak_gib']:.2f}",
            f"{r['reserved_gib']:.2f}",
            f"{r['step_s']:.3f}",
            f"{r['tokens_per_s']:.0f}",
        )
    Console().print(table)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_qlora.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
