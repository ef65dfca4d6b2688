"""Quantized inference: decode speed and memory of bf16 / int8 / int4 weights in one process, and the quality gate.

    python bench/bench_quant.py --device cuda                        # 7B decode (batch 1, 16) + 30B memory / decode
    python bench/bench_quant.py --device cuda --parts 7b             # one part per call (each well under 10 min)
    python bench/bench_quant.py --device cuda --parts 30b
    python bench/bench_quant.py --quality MODEL --data SHARDS        # perplexity of one model in bf16 / int8 / int4
    python bench/bench_quant.py --smoke                              # tiny shapes on CPU, to check the script runs

7b: random bf16 weights of the MPT-7B shape; the int8 and int4 models quantize the same weights (`smalto.quant`).
Each decodes greedily through `smalto.generate` (the compiled CUDA-graph step with smalto's decode kernels, EOS
ignored) after a `--prompt`-token prompt; ms per step = (time(new tokens) − time(1 token)) / (new − 1), so the
prefill is not counted. "floor": the bytes of every weight read once per step / `--bw` (H200: 4.8 TB/s).
30b: the MPT-30B shape, each format built directly on the GPU one block at a time (a block is initialised in bf16,
then quantized: int8 30B never needs the bf16 30B beside it); peak memory after building and after decoding
(torch.cuda.max_memory_allocated), and ms per step at batch 1.
The decode-linear kernel autotunes each (shape, fused work, format) at its first call; by default here it searches
the four tiles per row count that quantized weights search (`decode_linear.QUANT_TILES`, which hold the 16-bit
winners) for every format, so the run stays short; `--full-tune` gives 16-bit its full space (minutes per shape).
--quality: `smalto.load(MODEL, quantize=...)` and `smalto.eval.perplexity` on the same shards for each format; the
relative increase over bf16 is the gate (int8 ≤ 0.5%, int4 ≤ 3%).
Results: tables, and quant.json in $OUT when that variable is set.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smalto.generate import generate, get_decoder
from smalto.kernels import DecodeOptions, decode_linear
from smalto.kernels.decode_block import FusedDecodeBlock
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from smalto.quant import QuantLinear, QuantSpec, quantize

SHAPES = {
    "tiny": dict(d_model=128, n_heads=4, n_layers=2, vocab_size=512),
    "tiny30": dict(d_model=256, n_heads=4, n_layers=3, vocab_size=512),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
    "30b": dict(d_model=7168, n_heads=64, n_layers=48, vocab_size=50432),
}
FORMATS = ("bf16", "int8", "int4")
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
RESULTS: dict[str, Any] = {"decode": [], "memory": [], "quality": []}


def spec_of(fmt: str, group_size: int) -> QuantSpec | None:
    return None if fmt == "bf16" else QuantSpec(format=fmt, group_size=group_size)


def config_of(shape: str) -> MPTConfig:
    return MPTConfig.from_dict(
        {**SHAPES[shape], "max_seq_len": 2048, "no_bias": True, "attn_config": {"alibi": True}}
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: the blocks' weights (quantized or not) and the unembedding."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_random(shape: str, spec: QuantSpec | None, device: str, dtype: torch.dtype) -> MPTForCausalLM:
    """Random weights (std 0.02, norms 1) of `shape`, built on `device` one block at a time and quantized there."""
    model = MPTForCausalLM(config_of(shape), device="meta")
    tr = model.transformer
    for module in (tr.wte, tr.norm_f, *([tr.wpe] if hasattr(tr, "wpe") else [])):
        module.to_empty(device=device)
        _fill(module, dtype)
    for block in tr.blocks:
        block.to_empty(device=device)
        _fill(block, dtype)
        if spec is not None:
            for name, lin in list(block.named_modules()):
                if type(lin) is nn.Linear:
                    parent, _, attr = name.rpartition(".")
                    q = QuantLinear.from_linear(lin, spec, name)
                    setattr(block.get_submodule(parent), attr, q)
                    del lin
    return model.eval()


@torch.no_grad()
def _fill(module: nn.Module, dtype: torch.dtype) -> None:
    for name, p in module.named_parameters():
        if name.endswith("weight") and p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    module.to(dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_ms(
    model: MPTForCausalLM,
    batch: int,
    prompt: int,
    new: int,
    device: str,
    repeats: int,
    options: DecodeOptions | None = None,
) -> float:
    """ms per decode step (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).tolist()

    def run(n: int) -> None:
        generate(model, None, prompts, max_new_tokens=n, temperature=0, eos_token_id=[], options=options)

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            run(n)
            sync(device)
            best = min(best, time.perf_counter() - t)
        return best

    run(new)  # warm up: compile, autotune, CUDA graph capture
    run(1)
    return 1000 * (timed(new) - timed(1)) / (new - 1)


def decode_path(
    model: MPTForCausalLM, batch: int, prompt: int, new: int, options: DecodeOptions | None = None
) -> str:
    """What the last decode ran: the fused blocks (with the kernel reading which weights), and whether compiled."""
    dec = get_decoder(model, batch, prompt + new, model.device.type == "cuda", options)
    fused = sum(isinstance(b, FusedDecodeBlock) for b in dec.blocks)
    quant = any(isinstance(m, QuantLinear) for m in model.modules())
    kind = "int weights" if quant else "16-bit"
    return f"{'compiled' if dec.compiled else 'eager'}, {fused}/{len(dec.blocks)} fused blocks ({kind})"


def print_row(cols: list[str], widths: list[int]) -> None:
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), flush=True)


def part_7b(args: argparse.Namespace, shape: str, dtype: torch.dtype, bw: float) -> None:
    print(f"\n## decode, {shape} shape ({args.prompt}-token prompt, {args.new} new tokens)", flush=True)
    widths = [16, 6, 10, 10, 9, 9, 44]
    print_row(["format", "batch", "weights GB", "ms/step", "floor ms", "vs bf16", "path"], widths)
    base = build_random(shape, None, args.device, dtype)
    models = {"bf16": base}
    for fmt in FORMATS[1:]:  # the same weights, quantized (before any decode: no cached decoder is copied)
        models[fmt] = quantize(copy.deepcopy(base), spec_of(fmt, args.group_size))  # type: ignore[arg-type]
    bf16_ms: dict[int, float] = {}
    # int8 once per --quant-kernel choice; int4 once (the choice is how int8 becomes float)
    runs = [("bf16", "base")] + [
        (f, k) for f in FORMATS[1:] for k in args.quant_kernel[: 1 if f == "int4" else None]
    ]
    for batch in args.batch:
        for fmt, kernel in runs:
            m = models[fmt]
            options = DecodeOptions(quant_kernel=kernel)
            ms = decode_ms(m, batch, args.prompt, args.new, args.device, args.repeats, options)
            bf16_ms.setdefault(batch, ms)
            gb = weight_bytes(m) / 1e9
            ratio = ms / bf16_ms[batch]
            path = decode_path(m, batch, args.prompt, args.new, options)
            label = fmt if fmt != "int8" or len(args.quant_kernel) == 1 else f"{fmt}:{kernel}"
            print_row(
                [
                    label,
                    str(batch),
                    f"{gb:.2f}",
                    f"{ms:.3f}",
                    f"{gb * 1e9 / bw * 1e3:.3f}",
                    f"{ratio:.2f}×",
                    path,
                ],
                widths,
            )
            RESULTS["decode"].append(
                dict(
                    shape=shape,
                    format=fmt,
                    quant_kernel=kernel,
                    batch=batch,
                    weight_gb=gb,
                    ms=ms,
                    vs_bf16=ratio,
                    path=path,
                )
            )
    del models, base
    gc.collect()


def part_30b(args: argparse.Namespace, shape: str, dtype: torch.dtype) -> None:
    print(
        f"\n## memory and decode at batch 1, {shape} shape (built block by block on {args.device})",
        flush=True,
    )
    widths = [6, 10, 15, 17, 10, 9]
    print_row(["format", "weights GB", "peak GB (build)", "peak GB (decode)", "ms/step", "build s"], widths)
    cuda = args.device.startswith("cuda")
    for fmt in (
        "int4",
        "int8",
        "bf16",
    ):  # the smallest first: a failure of bf16 still leaves the others' figures
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        model = build_random(shape, spec_of(fmt, args.group_size), args.device, dtype)
        sync(args.device)
        built = time.perf_counter() - t
        peak_build = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        ms = decode_ms(model, 1, args.prompt, args.new_30b, args.device, 1)
        peak_decode = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        gb = weight_bytes(model) / 1e9
        print_row(
            [fmt, f"{gb:.2f}", f"{peak_build:.2f}", f"{peak_decode:.2f}", f"{ms:.3f}", f"{built:.0f}"], widths
        )
        RESULTS["memory"].append(
            dict(
                shape=shape,
                format=fmt,
                weight_gb=gb,
                peak_build_gb=peak_build,
                peak_decode_gb=peak_decode,
                ms=ms,
            )
        )
        del model  # and its decoder (cache, graphs), a plain attribute of it


def quality(args: argparse.Namespace) -> None:
    from smalto import load
    from smalto.eval.perplexity import find_split, perplexity

    split = find_split(args.data)
    print(f"\n## perplexity of {args.quality} on {split} ({args.device})", flush=True)
    widths = [6, 10, 11, 10, 8]
    print_row(["format", "loss", "perplexity", "vs bf16", "tokens"], widths)
    base = None
    for fmt in FORMATS:
        model = load(args.quality, dtype="bf16", device=args.device, quantize=spec_of(fmt, args.group_size))
        r = perplexity(model, split, batch_size=args.eval_batch, limit=args.limit)
        base = base if base is not None else r["perplexity"]
        rel = r["perplexity"] / base - 1
        print_row(
            [fmt, f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", f"{rel:+.2%}", str(r["tokens"])], widths
        )
        RESULTS["quality"].append(dict(model=args.quality, format=fmt, **r, vs_bf16=rel))
        del model
        gc.collect()


def quick_tiles(triton, rows: int, quant: bool = False) -> list:
    """Every format searches the tiles quantized weights search (see the module docstring)."""
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in decode_linear.QUANT_TILES[1 if rows == 1 else decode_linear.TILE_ROWS]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="7b,30b", help="7b (decode speed) and/or 30b (memory)")
    ap.add_argument("--batch", default="1,16", help="batch sizes of the 7b part")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64, help="new tokens per 7b run")
    ap.add_argument("--new-30b", type=int, default=32, help="new tokens per 30b run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument(
        "--bw", type=float, default=None, help="memory bandwidth, bytes/s (default: the device's)"
    )
    ap.add_argument(
        "--full-tune", action="store_true", help="16-bit weights autotune over the full tile space"
    )
    ap.add_argument(
        "--quant-kernel",
        default=DecodeOptions().quant_kernel,
        help="the 7b part's int8 kernel variants (int → float), comma-separated of decode_linear.QUANT_KERNELS "
        f"({', '.join(decode_linear.QUANT_KERNELS)}; 'all' for every one); int4 runs once",
    )
    ap.add_argument("--quality", metavar="MODEL", help="a model folder to score in bf16 / int8 / int4")
    ap.add_argument("--data", help="token shards for --quality (a `smalto data` folder or an MDS split)")
    ap.add_argument("--limit", type=int, default=None, help="--quality: samples to score (default all)")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in bf16")
    args = ap.parse_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    qk = args.quant_kernel
    args.quant_kernel = list(decode_linear.QUANT_KERNELS) if qk == "all" else qk.split(",")
    for k in args.quant_kernel:
        if k not in decode_linear.QUANT_KERNELS:
            raise SystemExit(
                f"--quant-kernel: unknown variant {k!r}; {', '.join(decode_linear.QUANT_KERNELS)}"
            )
    shapes = {"7b": "7b", "30b": "30b"}
    if args.smoke:
        args.device, args.prompt, args.new, args.new_30b, args.repeats = "cpu", 8, 4, 3, 1
        args.batch = [1, 2]
        shapes = {"7b": "tiny", "30b": "tiny30"}
    if not args.full_tune:
        decode_linear._configs = quick_tiles  # before the op is built (the decoder builds it)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bw = args.bw or next((v for k, v in BANDWIDTH.items() if k in name), 1e11)
    print(f"# bench_quant on {name}, torch {torch.__version__}, int4 group {args.group_size}", flush=True)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    if args.quality:
        if not args.data:
            raise SystemExit("--quality needs --data SHARDS")
        quality(args)
    else:
        for part in args.parts.split(","):
            if part == "7b":
                part_7b(args, shapes["7b"], dtype, bw)
            elif part == "30b":
                part_30b(args, shapes["30b"], dtype)
            else:
                raise SystemExit(f"--parts: unknown part {part!r}; 7b, 30b")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "quant.json"
        out.write_text(json.dumps({"device": name, "torch": torch.__version__, **RESULTS}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
