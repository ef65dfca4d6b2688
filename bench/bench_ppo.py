"""PPO on one GPU: rollout tokens/s and the generation vs training share of a step (random weights).

Builds what `smalto ppo` builds (smalto.train.ppo_trainer.PPOTrainer: the policy with a value head, a frozen
copy as reference, AdamW, bf16 autocast, the training attention plan) around a randomly initialised model of a
recipe's shape, and times `PPOTrainer.step` on random prompts. Rollouts run smalto's decoder (static KV cache,
the compiled CUDA-graph decode step); every response runs the full `max_new_tokens` (no EOS), and the score is a
cheap rule on the tokens, so the figures are the decoder's and the update's, not a reward model's.

    python bench/bench_ppo.py --device cuda                                   # MPT-1B, batch 64, 128 + 128 tokens
    python bench/bench_ppo.py --device cuda --batches 32,64,128 --new-tokens 128,256
    python bench/bench_ppo.py --smoke                                         # CPU, tiny shapes: does it run?

Columns: rollout tokens/s (generated tokens / generation time), the generation and training shares of the step
(training = scoring, reference, advantages and the PPO epochs), the step time and peak memory. The first step
(compilation, CUDA graph capture) is not timed. Results: a rich table, and bench_ppo.json in $OUT when set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
from contextlib import nullcontext

import torch
from rich.console import Console
from rich.table import Table

from smalto.config import OptimizerConfig, load_config
from smalto.model.heads import MPTWithValueHead
from smalto.model.mpt import MPTForCausalLM
from smalto.train.optim import build_optimizer
from smalto.train.ppo import PPOSection
from smalto.train.ppo_trainer import PPOTrainer


def run(recipe: str, device: str, batch: int, prompt: int, new: int, steps: int, mini: int) -> dict:
    from smalto.kernels import apply, apply_inference, select

    cfg = load_config(recipe).model
    dev = torch.device(device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    policy = MPTForCausalLM(cfg, device=dev).to(dtype).eval()
    apply_inference(policy)
    if dev.type == "cuda":
        plan = select(cfg, "train", device=dev, dtype=torch.bfloat16, batch=mini, seq=prompt + new)
        apply(policy, {"train": plan})
    ref = copy.deepcopy(policy).requires_grad_(False)
    model = MPTWithValueHead(policy)
    section = PPOSection(batch_size=batch, mini_batch_size=mini, ppo_epochs=4, max_new_tokens=new)
    trainer = PPOTrainer(
        model,
        nullcontext,
        ref,
        lambda prompts, responses: torch.tensor([sum(t % 2 for t in r) / len(r) for r in responses]),
        build_optimizer(
            model,
            OptimizerConfig(name="adamw", lr=1e-6, state_dtype="bf16" if dev.type == "cuda" else "fp32"),
        ),
        section,
        pad_id=0,
        eos_id=None,
        seed=0,
    )
    rng = random.Random(0)
    stats = []
    for i in range(steps + 1):
        prompts = [[rng.randrange(1, cfg.vocab_size) for _ in range(prompt)] for _ in range(batch)]
        s = trainer.step(prompts, seed=i)
        if i > 0:  # the first step compiles and captures
            stats.append(s)
    mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    return {
        "recipe": recipe,
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "mini_batch": mini,
        "rollout_tokens_per_s": mean["throughput/rollout_tokens_per_s"],
        "generation_share": mean["time/generation_share"],
        "training_share": mean["time/training_share"],
        "step_s": mean["time/step_s"],
        "peak_gib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="mpt-1b", help="whose model section gives the shapes")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64", help="rollouts per step, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", default="128", help="comma-separated")
    ap.add_argument("--mini-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, one timed step")
    a = ap.parse_args()
    if a.smoke:
        a.recipe, a.device, a.batches, a.prompt_tokens, a.new_tokens, a.mini_batch, a.steps = (
            "tiny",
            "cpu",
            "4",
            8,
            "8",
            2,
            1,
        )
    rows = [
        run(a.recipe, a.device, b, a.prompt_tokens, n, a.steps, a.mini_batch)
        for b in map(int, a.batches.split(","))
        for n in map(int, a.new_tokens.split(","))
    ]
    table = Table(title=f"PPO step, {a.recipe} (random weights) on {a.device}")
    for col in ("batch", "prompt + new", "rollout tok/s", "generation", "training", "step s", "peak GiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            f"{r['prompt_tokens']} + {r['new_tokens']}",
            f"{r['rollout_tokens_per_s']:,.0f}",
            f"{100 * r['generation_share']:.0f}%",
            f"{100 * r['training_share']:.0f}%",
            f"{r['step_s']:.2f}",
            f"{r['peak_gib']:.1f}",
        )
    Console().print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_ppo.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
