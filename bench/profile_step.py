"""Where a training step's GPU time goes: kernel time by category for one MPT shape (torch.profiler).

python bench/profile_step.py --shape 1b --micro-batch 16            # on a GPU
python bench/profile_step.py --shape 1b --micro-batch 16 --attn flex # FlexAttention instead of cuDNN
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM, causal_lm_loss
from smalto.train.optim import DecoupledLionW

SHAPES = {"125m": (768, 12, 12), "1b": (2048, 16, 24), "7b": (4096, 32, 32)}

CATEGORIES = [  # first match wins
    ("attention", ("flex", "attention", "fmha", "flash", "sdpa", "cudnn")),
    ("gemm", ("gemm", "sm90", "cutlass", "cublas", "nvjet", "matmul", "xmma")),
    ("optimizer", ("foreach", "multi_tensor")),
    ("loss", ("nll", "log_softmax", "cross_entropy")),
    ("triton-fused", ("triton",)),
    ("copy/cast", ("copy", "cast", "to_copy")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1b")
    p.add_argument("--micro-batch", type=int, default=12)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--attn", default="auto", help="attn_impl: auto (cudnn when installed, else flex), flex, cudnn"
    )
    args = p.parse_args()
    d, h, n = SHAPES[args.shape]
    cfg = MPTConfig.from_dict(
        dict(
            d_model=d,
            n_heads=h,
            n_layers=n,
            max_seq_len=args.seq,
            vocab_size=50432,
            no_bias=True,
            attn_config={"alibi": True, "attn_impl": args.attn},
        )
    )
    model = MPTForCausalLM(cfg, device="cuda").train()
    for block in model.transformer.blocks:
        block.compile()
    opt = DecoupledLionW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randint(0, 50432, (args.micro_batch, args.seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = causal_lm_loss(model.unembed(model.transformer(x)), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if t <= 0:
            continue
        by_cat[category(evt.key)] += t / 3
        by_name[evt.key] += t / 3
    total = sum(by_cat.values())
    print(f"{args.shape} mb {args.micro_batch}: GPU kernel time per step {total / 1e3:.1f} ms")
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:14s} {t / 1e3:8.1f} ms  {100 * t / total:5.1f}%")
    print("top kernels:")
    for name, t in sorted(by_name.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {t / 1e3:8.2f} ms  {name[:110]}")
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, f"trace_{args.shape}.json"))


if __name__ == "__main__":
    main()
