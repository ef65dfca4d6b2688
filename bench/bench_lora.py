"""LoRA on one GPU: peak memory and tokens/s of a smalto LoRA step, the same model's full-finetuning step, and PEFT
on transformers' MptForCausalLM with gradient checkpointing, in one process on random weights (no hub).

smalto's steps are `smalto.train.loop.train_step` on the trainer `smalto finetune` builds
(`smalto.train.setup.build_trainer`: bf16, the attention plan, activation checkpointing, the chunked loss where the
logits are large), with a `lora` section for LoRA (the base frozen in bf16: no weight-gradient products) and without
one for full finetuning (AdamW with bf16 state, the cheapest that holds 7B on one GPU). PEFT's step is what a
transformers Trainer with `bf16=True` and `gradient_checkpointing=True` runs: bf16 base, float32 adapters, autocast,
AdamW over the adapters. Rows are full (seq tokens of targets each); tokens/s counts them all.

    python bench/bench_lora.py                          # MPT-7B, r 16, four projections, seq 2048, micro-batch 4
    python bench/bench_lora.py --layers 16              # a shallower MPT-7B, when full finetuning does not fit
    python bench/bench_lora.py --only smalto-lora,peft --peft-micro 4,1
    python bench/bench_lora.py --only smalto-lora --ac-mode full,selective   # selective checkpointing's gain
    python bench/bench_lora.py --smoke                  # CPU, tiny shapes: does it run?

Results: a rich table, and bench_lora.json in $OUT when set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from smalto.adapters import LoraConfig
from smalto.config import load_config
from smalto.errors import UserError
from smalto.train.loop import train_step
from smalto.train.parallel import close_world, init_world
from smalto.train.setup import build_trainer

FOUR = ["Wqkv", "out_proj", "up_proj", "down_proj"]


AC_MODES = {"full": "true", "selective": "selective"}  # --ac-mode → train.activation_checkpointing


def recipe(args: argparse.Namespace, micro: int, full: bool, ac_mode: str = "full") -> Any:
    overrides = [
        "optimizer.name=adamw",
        "optimizer.betas=[0.9,0.999]",
        f"optimizer.state_dtype={'bf16' if full else 'fp32'}",
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro}",
        f"train.activation_checkpointing={AC_MODES[ac_mode] if args.ac else 'false'}",
        f"train.compile={str(args.compile).lower()}",
        "train.weight_cast=micro_batch",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"model.max_seq_len={args.seq}",
        f"data.seq_len={args.seq}",
    ]
    if args.layers:
        overrides.append(f"model.n_layers={args.layers}")
    if args.smoke:
        overrides += ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.vocab_size=512"]
        overrides += ["train.precision=fp32", "train.compile=false"]
    cfg = load_config("mpt-7b", overrides)
    if not full:
        cfg.lora = LoraConfig(r=args.r, alpha=2 * args.r, dropout=0.05, targets=FOUR)
    return cfg


def random_batches(n: int, micro: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "sequence_id": torch.zeros_like(ids)})
    return out


def timed(step: Any, n_warmup: int, n_steps: int, device: torch.device) -> float:
    """Seconds per step after `n_warmup` untimed steps."""
    for _ in range(n_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n_steps


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_smalto(name: str, micro: int, args: argparse.Namespace, world: Any, ac_mode: str = "full") -> dict:
    full = name == "smalto-full"
    cfg = recipe(args, micro, full, ac_mode)
    label = f"{name} (ac {ac_mode})" if args.ac and len(args.ac_modes) > 1 else name
    row: dict[str, Any] = {"name": label, "micro": micro, "seq": args.seq}
    t = None
    try:
        reset(world.device)
        t = build_trainer(cfg, world)
        t.logger.enabled = False
        data = random_batches(args.warmup + args.steps, micro, args.seq, cfg.model.vocab_size)
        it = iter(data)
        trainer = t
        seconds = timed(lambda: train_step(trainer, [next(it)]), args.warmup, args.steps, world.device)
        if args.profile:
            profile_step(lambda: train_step(trainer, [data[-1]]), name)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        row.update(
            tokens_per_s=micro * args.seq / seconds, peak_gib=peak_gib(world.device), trainable=trainable
        )
    except UserError as e:  # out of memory: train_step says so
        row.update(error=str(e).split(";")[0])
    finally:
        t = None
        reset(world.device)
    return row


def profile_step(step: Any, name: str) -> None:
    """One more step under torch.profiler: the kernels that take the most device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"--- {name}: one step, top kernels by device time")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))


def bench_peft(micro: int, args: argparse.Namespace, device: torch.device) -> dict:
    """PEFT LoRA on transformers' MptForCausalLM (bf16 base, float32 adapters, gradient checkpointing, autocast)."""
    import peft
    import transformers

    cfg = recipe(args, micro, full=False).model
    hf_cfg = transformers.MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=cfg.expansion_ratio,
        max_seq_len=cfg.max_seq_len,
        vocab_size=cfg.vocab_size,
        no_bias=cfg.no_bias,
        attn_config={"alibi": True, "attn_impl": "torch"},
        use_cache=False,
    )
    row: dict[str, Any] = {"name": "peft", "micro": micro, "seq": args.seq}
    model: Any = None
    lora_model: Any = None
    opt: Any = None
    try:
        reset(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
        with torch.device(device):  # built on the device: no 7B float32 copy on the host
            model = transformers.MptForCausalLM._from_config(
                hf_cfg, **{"dtype" if new else "torch_dtype": dtype}
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lcfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=FOUR)
        lora_model = peft.get_peft_model(model, lcfg)
        lora_model.train()
        opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=2e-4)
        data = random_batches(args.warmup + args.steps, micro, args.seq, cfg.vocab_size)
        it = iter(data)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step() -> None:
            ids = next(it)["input_ids"].to(device)
            with autocast:
                loss = lora_model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds = timed(step, args.warmup, args.steps, device)
        row.update(tokens_per_s=micro * args.seq / seconds, peak_gib=peak_gib(device))
    except torch.OutOfMemoryError:
        row.update(error="out of memory")
    finally:
        model = lora_model = opt = None
        reset(device)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="smalto-lora,smalto-full,peft")
    ap.add_argument("--micro", type=int, default=4, help="smalto's micro-batch")
    ap.add_argument("--peft-micro", default="4,1", help="PEFT's micro-batches")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than MPT-7B's 32 (same width)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--ac", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing"
    )
    ap.add_argument(
        "--ac-mode",
        default="full",
        help="activation checkpointing of the smalto steps, comma-separated to run each: full (every block "
        "recomputed) or selective (attention's outputs kept)",
    )
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="per-block compile"
    )
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one more step (CUDA)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 1 step: does it run?")
    args = ap.parse_args()
    args.ac_modes = args.ac_mode.split(",")
    if not set(args.ac_modes) <= set(AC_MODES):
        ap.error(f"--ac-mode {args.ac_mode!r}: comma-separated {', '.join(AC_MODES)}")
    if args.smoke:
        args.device, args.steps, args.warmup, args.seq, args.micro, args.peft_micro = "cpu", 1, 1, 64, 2, "2"
        args.profile = False
    world = init_world(args.device)
    which = args.only.split(",")
    results = []
    try:
        for name in ("smalto-lora", "smalto-full"):
            if name in which:
                for mode in args.ac_modes if args.ac else ["full"]:
                    results.append(bench_smalto(name, args.micro, args, world, mode))
        if "peft" in which:
            results += [bench_peft(int(m), args, world.device) for m in args.peft_micro.split(",")]
    finally:
        close_world(world)
    shape = (
        f"MPT-7B{f' ({args.layers} layers)' if args.layers else ''}{' (smoke shapes)' if args.smoke else ''}"
    )
    table = Table(title=f"LoRA r {args.r} on {', '.join(FOUR)}, {shape}, seq {args.seq}, {args.device}")
    for col in ("step", "micro-batch", "peak GiB", "tokens/s", "trainable parameters"):
        table.add_column(col)
    for r in results:
        if "error" in r:
            table.add_row(r["name"], str(r["micro"]), r["error"], "", "")
            continue
        trainable = f"{r['trainable']:,}" if "trainable" in r else "-"
        table.add_row(
            r["name"], str(r["micro"]), f"{r['peak_gib']:.1f}", f"{r['tokens_per_s']:,.0f}", trainable
        )
    Console().print(table)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_lora.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
