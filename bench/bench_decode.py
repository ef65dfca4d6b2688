"""Decode speed: smalto's static-cache decode (compiled into a CUDA graph) vs transformers' MptForCausalLM.generate.

    python bench/bench_decode.py --device cuda --shapes 1b,7b --batch 1,16
    python bench/bench_decode.py --device cuda --shapes 7b,llama2-7b --batch 1,16   # Llama-2-7B beside MPT-7B
    python bench/bench_decode.py --smoke            # tiny shapes on CPU, to check the script runs

Random-weight models of the MPT-1B / MPT-7B shapes (ALiBi, no biases: a config transformers' native class computes
exactly) and of Llama-2-7B (`llama2-7b`: RoPE, RMSNorm, SwiGLU, untied head; against LlamaForCausalLM), in bf16.
Both implementations share the same weight tensors. Each run: a `--prompt`-token prompt, then
`--new` tokens greedily with EOS ignored. Decode time per step = (time(new tokens) - time(1 token)) / (new - 1), so the
prefill is not counted. The floor is reading every weight once per step: weight bytes / `--bw`, by default the
device's peak memory bandwidth when it is known (H100 SXM 3.35e12 B/s, H200 4.8e12).
Results: a table, and `decode.json` in $OUT when that variable is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from smalto.generate import generate
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

SHAPES = {
    "tiny": dict(d_model=128, n_heads=4, n_layers=2, vocab_size=512),
    "1b": dict(d_model=2048, n_heads=16, n_layers=24, vocab_size=50432),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
}
# LLaMA-family shapes (meta-llama/Llama-2-7b-hf's config.json; a tiny one for --smoke): RoPE, RMSNorm, SwiGLU,
# untied head; compared with transformers' LlamaForCausalLM
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                       intermediate_size=344, vocab_size=512),
    "llama2-7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                      intermediate_size=11008, vocab_size=32000),
}  # fmt: skip


def build_llama(shape: str, device: str, dtype: torch.dtype) -> tuple[MPTForCausalLM, torch.nn.Module]:
    """smalto's model read from a LlamaConfig (smalto.hf.llama) and transformers' LlamaForCausalLM over the same
    weight tensors (q/k/v_proj are views of smalto's Wqkv rows)."""
    import transformers

    from smalto.hf.llama import config_from_llama, tensors_to_llama

    hf_cfg = transformers.LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg = config_from_llama(hf_cfg.to_dict(), shape)
    model = MPTForCausalLM(cfg, device="meta")
    model.to_empty(device=device)
    model.init_weights()
    model.to(dtype).eval()
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    state = tensors_to_llama(model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.device(device):  # its rotary frequencies are a buffer, not state: built where the model runs
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
    return model, hf.eval()


def build(shape: str, device: str, dtype: torch.dtype) -> tuple[MPTForCausalLM, torch.nn.Module]:
    """smalto's model and transformers' MptForCausalLM (LlamaForCausalLM for `LLAMA_SHAPES`) over the same weight
    tensors (one copy in memory)."""
    import transformers

    if shape in LLAMA_SHAPES:
        return build_llama(shape, device, dtype)
    cfg = MPTConfig.from_dict(
        {**SHAPES[shape], "max_seq_len": 2048, "no_bias": True, "attn_config": {"alibi": True}}
    )
    model = MPTForCausalLM(cfg, device="meta")
    model.to_empty(device=device)
    model.init_weights()
    model.to(dtype).eval()
    hf_cfg = transformers.MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
        attn_config={"attn_impl": "torch"},
        use_cache=True,
    )
    with torch.device("meta"):
        hf = transformers.MptForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.lm_head.weight = hf.transformer.wte.weight  # tied, as in the checkpoints
    return model, hf.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def decode_ms(run, device: str, new: int, repeats: int) -> float:
    """ms per decode step: the time of `new` tokens minus the time of 1 (the prefill), per extra token."""
    run(new)  # warm up: compile / CUDA graph capture / allocator
    run(1)
    t_full = timed(lambda: run(new), device, repeats)
    t_one = timed(lambda: run(1), device, repeats)
    return 1000 * (t_full - t_one) / (new - 1)


# peak memory bandwidth (B/s) by a word of the device name: the floor of a decode step that reads every weight once
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def peak_bandwidth(device_name: str) -> float:
    for word, bw in BANDWIDTH.items():
        if word in device_name:
            return bw
    if device_name == "cpu":
        return 1e11  # a nominal figure: the smoke run's floor column means nothing
    raise SystemExit(f"unknown memory bandwidth of {device_name!r}: pass --bw BYTES_PER_S")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="1b,7b")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument(
        "--bw",
        type=float,
        default=None,
        help="memory bandwidth in bytes/s (default: the device's, when known)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (faster)")
    ap.add_argument("--eager", action="store_true", help="also time smalto's decode without compile")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in fp32")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.shapes, args.batch, args.prompt, args.new, args.repeats = (
            "cpu",
            "tiny,llama-tiny",
            "1,2",
            16,
            8,
            1,
        )
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    compile_ = args.device.startswith("cuda")
    if args.bw is None:
        args.bw = peak_bandwidth(torch.cuda.get_device_name() if compile_ else "cpu")

    from rich.console import Console
    from rich.table import Table

    results = []
    for shape in args.shapes.split(","):
        model, hf = build(shape, args.device, dtype)
        weight_bytes = sum(
            p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
        )
        floor = 1000 * weight_bytes / args.bw
        for batch in [int(b) for b in args.batch.split(",")]:
            g = torch.Generator().manual_seed(0)
            prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=g).tolist()

            def ours(
                n: int, compile: bool = compile_, prompts: list = prompts, model: MPTForCausalLM = model
            ) -> None:
                generate(model, None, prompts, max_new_tokens=n, temperature=0, compile=compile)

            row = {
                "shape": shape,
                "batch": batch,
                "prompt": args.prompt,
                "new": args.new,
                "device": args.device,
                "dtype": str(dtype).removeprefix("torch."),
                "params": model.num_params(),
                "floor_ms": floor,
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "torch": torch.__version__,
            }
            row["smalto_ms"] = decode_ms(ours, args.device, args.new, args.repeats)
            if args.eager:
                row["smalto_eager_ms"] = decode_ms(
                    lambda n: ours(n, compile=False), args.device, args.new, args.repeats
                )
            if not args.no_hf:
                ids = torch.tensor(prompts, device=args.device)

                def theirs(n: int, ids: torch.Tensor = ids, hf: Any = hf) -> None:
                    with torch.inference_mode():
                        hf.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=n,
                            min_new_tokens=n,
                            do_sample=False,
                            pad_token_id=0,
                        )

                row["transformers_ms"] = decode_ms(theirs, args.device, args.new, args.repeats)
            results.append(row)
        del model, hf
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if compile_ else args.device
    table = Table(
        title=f"decode, {args.prompt}-token prompt, {args.new} new tokens, greedy ({name}; floor at "
        f"{args.bw / 1e12:.2f} TB/s)"
    )
    for col in (
        "shape",
        "batch",
        "floor ms",
        "smalto ms/step",
        "× floor",
        "smalto tok/s",
        "eager ms/step",
        "transformers ms/step",
        "transformers tok/s",
        "speed-up",
    ):
        table.add_column(col, justify="right")
    for r in results:
        hf_ms = r.get("transformers_ms")
        table.add_row(
            r["shape"],
            str(r["batch"]),
            f"{r['floor_ms']:.2f}",
            f"{r['smalto_ms']:.2f}",
            f"{r['smalto_ms'] / r['floor_ms']:.2f}",
            f"{1000 * r['batch'] / r['smalto_ms']:,.0f}",
            f"{r['smalto_eager_ms']:.2f}" if "smalto_eager_ms" in r else "-",
            f"{hf_ms:.2f}" if hf_ms else "-",
            f"{1000 * r['batch'] / hf_ms:,.0f}" if hf_ms else "-",
            f"{hf_ms / r['smalto_ms']:.1f}×" if hf_ms else "-",
        )
    Console(width=200).print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "decode.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
