"""Where an end-to-end decode step loses time against the replayed CUDA graph: the host's work per step.

    python bench/decode_overhead.py 1b:1 7b:1        # SHAPE:BATCH …, random bf16 weights, 128-token prompt

Per shape and batch, ms per step of 128 new tokens:
    generate      smalto.generate.generate, greedy (what bench/bench_decode.py times), host check every 8 steps
    generate/128  the same with the host looking at the tokens once, at the end
    replay        Decoder.step + argmax in a loop, one fixed position (what bench/decode_kernels.py times)
    enqueue       the host's time to issue one `replay` step (its CPU cost: a step is host-bound when this is
                  not below `replay`)
Output: a table, and decode_overhead.json in $OUT when set. Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from smalto.generate import generate, get_decoder
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

SHAPES = {
    "1b": dict(d_model=2048, n_heads=16, n_layers=24, vocab_size=50432),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
}


def best_ms(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 1000 * best


@torch.inference_mode()
def measure(model: MPTForCausalLM, batch: int) -> dict:
    prompts = torch.randint(0, model.config.vocab_size, (batch, 128)).tolist()

    def gen(n: int, every: int | None = None) -> None:
        generate(model, None, prompts, max_new_tokens=n, temperature=0, check_every=every)

    row = {}
    for name, every in (("generate", None), ("generate/128", 128)):
        gen(128, every)
        row[name] = (
            best_ms(lambda every=every: gen(128, every)) - best_ms(lambda every=every: gen(1, every))
        ) / 127
    dec = get_decoder(model, batch, 256, compile=True)
    ids = torch.tensor(prompts, device="cuda")
    tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)[:, None]
    pos = torch.full((1,), 128, dtype=torch.long, device="cuda")

    def replay(n: int = 100) -> None:
        t = tok
        for _ in range(n):
            t = dec.step(t, pos).argmax(-1)[:, None]

    replay(3)
    row["replay"] = best_ms(replay) / 100
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    replay(20)
    row["enqueue"] = 1000 * (time.perf_counter() - t0) / 20  # no sync inside: the host's issue time
    torch.cuda.synchronize()
    return {k: round(v, 3) for k, v in row.items()}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    from rich.console import Console
    from rich.table import Table

    rows = []
    for arg in sys.argv[1:]:
        shape, batch = arg.split(":")
        cfg = MPTConfig.from_dict(
            {**SHAPES[shape], "max_seq_len": 2048, "no_bias": True, "attn_config": {"alibi": True}}
        )
        model = MPTForCausalLM(cfg, device="cuda").to(torch.bfloat16).eval()
        rows.append({"shape": shape, "batch": int(batch), **measure(model, int(batch))})
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    table = Table(title=f"decode ms per step ({torch.cuda.get_device_name()})")
    for c in ("shape", "batch", "generate", "generate/128", "replay", "enqueue"):
        table.add_column(c)
    for r in rows:
        table.add_row(
            *(str(r[c]) for c in ("shape", "batch", "generate", "generate/128", "replay", "enqueue"))
        )
    Console(width=120).print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "decode_overhead.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
