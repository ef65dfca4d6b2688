"""DPO steps on one GPU: real tokens/s and peak memory of `smalto dpo`'s step on MPT-1B (full) and MPT-7B (LoRA).

Builds the step as `smalto dpo` does (`smalto.train.setup.build_trainer` on the model recipe's shapes, bf16, the DPO
objective of smalto/train/dpo.py with its reference: a frozen copy, or the policy with adapters disabled under
LoRA), random weights, and times `DPO.step` on synthetic preference pairs with an HH-like length mix (at
max_length 1024: prompts 102-511 tokens, completions 32-306). "real tokens/s" counts the prompt and completion tokens of
the chosen and the rejected sequence of every pair (not padding), once per step although the reference reads them
too.

    python bench/bench_dpo.py --device cuda                                # mpt-1b full, mpt-7b with LoRA r 16
    python bench/bench_dpo.py --device cuda --models mpt-1b --micro-batches 2,4,8 --steps 8
    python bench/bench_dpo.py --smoke                                      # CPU, tiny shapes: does it run?

Models: `NAME` (full parameters) or `NAME:lora` (LoRA r 16 on every linear layer, base bf16; needs smalto's LoRA).
Results: a rich table, and bench_dpo.json in $OUT when set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from smalto.config import RunConfig, load_config
from smalto.data.preference_stream import PreferenceDataConfig
from smalto.errors import UserError
from smalto.train.dpo import DPO, DPOSection, FrozenReference, make_reference
from smalto.train.parallel import close_world, init_world
from smalto.train.setup import build_trainer

TINY = {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "vocab_size": 512}
LORA = {"r": 16, "alpha": 32, "targets": "all-linear"}


def bench_config(
    model: str, *, lora: bool, max_length: int, micro: int, device: str, smoke: bool
) -> RunConfig:
    shape = TINY if smoke else load_config(model).model.to_dict()
    d: dict[str, Any] = {
        "name": f"bench-dpo-{model}",
        "run_dir": os.environ.get("OUT", "/tmp") + "/bench-dpo",
        "model": {**shape, "max_seq_len": max(max_length, shape.get("max_seq_len", 0))},
        "data": {"sources": [{"path": "synthetic"}], "max_length": max_length},
        "optimizer": {"name": "adamw", "lr": 5.0e-7, "betas": [0.9, 0.999], "weight_decay": 0.0},
        "train": {
            "global_batch_size": micro, "micro_batch_size": micro, "device": device, "max_duration": "1000ba",
            "precision": "fp32" if device == "cpu" else "bf16", "activation_checkpointing": not smoke,
        },
        "logging": {"progress": False, "tensorboard": False},
    }  # fmt: skip
    extra: dict[str, Any] = {"base_model": None, "dpo": DPOSection()}
    if lora:
        from smalto.dpo import lora_section

        extra["lora"] = lora_section(LORA)
    return RunConfig.from_dict(d, data_cls=PreferenceDataConfig, extra=extra)


def pairs(n: int, max_length: int, vocab: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """A micro-batch of `n` pairs shaped as PreferenceDataset rows (prompt labels -100, right padding)."""
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
    }
    for _ in range(n):
        prompt = rng.integers(1, vocab, int(rng.integers(max_length // 10, max_length // 2)))
        for name in ("chosen", "rejected"):
            completion = rng.integers(1, vocab, int(rng.integers(max_length // 32, max_length * 3 // 10)))
            ids = np.concatenate([prompt, completion])[:max_length]
            labels = np.concatenate([np.full(len(prompt), -100), completion])[:max_length]
            row, lab = np.zeros(max_length, np.int64), np.full(max_length, -100, np.int64)
            row[: len(ids)], lab[: len(labels)] = ids, labels
            out[f"{name}_ids"].append(torch.from_numpy(row))
            out[f"{name}_labels"].append(torch.from_numpy(lab))
    return {k: torch.stack(v) for k, v in out.items()}


def run_one(spec: str, micro: int, args: argparse.Namespace) -> dict[str, Any]:
    model, _, adapter = spec.partition(":")
    lora = adapter == "lora"
    try:
        cfg = bench_config(
            model, lora=lora, max_length=args.max_length, micro=micro, device=args.device, smoke=args.smoke
        )
    except UserError as e:  # e.g. NAME:lora without smalto's LoRA
        return {"model": spec, "micro_batch": micro, "error": str(e)}
    world = init_world(cfg.train.device)
    try:
        t = build_trainer(cfg, world)
        objective = DPO(cfg.dpo)
        objective.reference = make_reference(t) if lora else FrozenReference(t, weights=None)
        rng = np.random.default_rng(0)
        batches = [pairs(micro, args.max_length, cfg.model.vocab_size, rng) for _ in range(args.steps + 1)]
        objective.step(t, [batches[0]])  # warm-up: allocations, kernel choices
        if world.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, real = time.perf_counter(), 0.0
        for mb in batches[1:]:
            metrics, _ = objective.step(t, [mb])
            real += metrics["throughput/real_tokens_per_s"] * metrics["time/step_s"]
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if world.device.type == "cuda" else float("nan")
        return {
            "model": spec, "micro_batch": micro, "max_length": args.max_length, "steps": args.steps,
            "step_s": seconds / args.steps, "real_tokens_per_s": real / seconds, "peak_gib": peak,
            "loss": metrics["train/loss"],
        }  # fmt: skip
    except UserError as e:
        return {"model": spec, "micro_batch": micro, "error": str(e)}
    finally:
        close_world(world)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mpt-1b,mpt-7b:lora", help="NAME or NAME:lora, comma-separated")
    p.add_argument("--micro-batches", default="4", help="pairs per micro-batch, comma-separated")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 steps")
    args = p.parse_args()
    if args.smoke:
        args.device, args.steps, args.max_length, args.models = "cpu", 2, 128, "tiny"
    rows = [run_one(m, int(b), args) for m in args.models.split(",") for b in args.micro_batches.split(",")]
    table = Table(title=f"smalto dpo steps, max_length {args.max_length}, random weights")
    for col in ("model", "pairs / micro-batch", "step s", "real tokens/s", "peak GiB", "note"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], str(r["micro_batch"]), "-", "-", "-", r["error"][:80])
        else:
            table.add_row(r["model"], str(r["micro_batch"]), f"{r['step_s']:.3f}", f"{r['real_tokens_per_s']:,.0f}",
                          f"{r['peak_gib']:.1f}", "")  # fmt: skip
    Console().print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_dpo.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
