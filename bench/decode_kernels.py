"""Which kernels a compiled decode step should use: the step timed with its attention / linears swapped.

    python bench/decode_kernels.py 1b:1:sdpa:profile 1b:1:triton 7b:16:sdpa 7b:16:triton 7b:16:reductions
    (each argument SHAPE:BATCH:VARIANT[:profile]; variant words combine with '+', e.g. auto+cublas)

The decode step is smalto's (`smalto.generate.Decoder`: static per-layer KV cache of 256 slots, compiled with
`mode="reduce-overhead"` into a CUDA graph) on a random-weight bf16 model after a 128-token prefill, with its
`DecodeOptions` or its decode attention plan set per variant:

    auto             what `attn_impl: auto` runs: the Triton kernel when batch × heads ≥ the SM count, else SDPA
    sdpa             F.scaled_dot_product_attention with the ALiBi+mask bias (cuDNN / cutlass)
    triton           smalto's Triton decode kernel (smalto/kernels/decode_attention.py), at any batch
    no-cudnn         the same with PyTorch's cuDNN attention backend switched off
    flex-decoding    FlexAttention (its split-KV decoding kernel for one query) with ALiBi and the mask as a score_mod
    matmul           q·kᵀ and p·v as batched matmuls, softmax between (three kernels)
    reductions       q·kᵀ and p·v as elementwise-multiply + sum, left to inductor to fuse into reductions
    cublas           the linears (and the unembedding) on cuBLAS instead of smalto's decode-linear kernel
                     (smalto/kernels/decode_linear.py, what ships): DecodeOptions(linear_rows=0)
    unfused          that kernel, without the norms, activation and residual adds fused into it (fuse=False)
    normrows16       the norms fused on up to 16 rows too (norm_rows=16; shipped: 1)
    combo            inductor's horizontal fusion of independent kernels (combo_kernels), e.g. the K and V cache
                     writes of a layer in one launch
    cublaslt         cublas, with PyTorch's preferred BLAS library set to cuBLASLt (other kernel heuristics)
    cdt              inductor's coordinate-descent tuning of its own kernels
    kb32, kw8, ks2   the Triton decode kernel's launch: slots per loop step (BLOCK), warps, pipeline stages
                     (DecodeOptions.attention_launch), e.g. 7b:16:triton+kb128+kw8

Each row: ms per step (best of 3 × 100 replays), compile seconds, the largest |Δ| of the logits against the
uncompiled step with SDPA and cuBLAS, and with `:profile` the per-step GPU time of the top kernels. Output: JSON
lines, and
decode_kernels.json in $OUT when set. Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from smalto.generate import Decoder
from smalto.kernels import DecodeOptions, select
from smalto.model.attention import SDPA, AttentionInputs, AttentionKernel, AttentionPlan
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

SHAPES = {
    "1b": dict(d_model=2048, n_heads=16, n_layers=24, vocab_size=50432),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
}


def matmul_attention(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float):
    bias, _ = inputs.state
    s = (q @ k.transpose(-2, -1)).float() * scale + bias.float()
    return s.softmax(-1).to(q.dtype) @ v


def reduction_attention(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float):
    bias, _ = inputs.state
    s = (q.float() * k.float()).sum(-1) * scale + bias[:, :, 0].float()  # (B, H, S)
    return (s.softmax(-1)[..., None] * v.float()).sum(-2, keepdim=True).to(q.dtype)  # (B, H, 1, D)


def flex_decoding_attention(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float):
    from torch.nn.attention.flex_attention import flex_attention

    mask, slopes = inputs.mask, inputs.slopes
    assert slopes is not None and mask.key_valid is not None  # ALiBi shapes, a cache's slots

    q_pos, valid = mask.q_pos, mask.key_valid

    def score_mod(score, b, h, q_idx, kv_idx):
        qp = q_pos[q_idx]
        ok = (kv_idx <= qp) & (valid[b, kv_idx] | (kv_idx == qp))
        return torch.where(ok, score + slopes[h] * (kv_idx - qp).to(score.dtype), -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


ATTENTION = {  # decode attention kernels to compare, as plans the decoder is given
    "matmul": AttentionKernel("matmul", matmul_attention, prepare=SDPA.prepare),
    "reductions": AttentionKernel("reductions", reduction_attention, prepare=SDPA.prepare),
    "flex-decoding": AttentionKernel("flex-decoding", flex_decoding_attention),
}


def configure(variant: str) -> tuple[DecodeOptions, AttentionKernel | None]:
    """The decode options and the attention kernel (None: what `select` chooses) of a variant; sets the global
    switches of torch and inductor that some variants name."""
    import torch._inductor.config as inductor

    words = set(variant.split("+"))
    launch = {w for w in words if re.fullmatch(r"k[bws]\d+", w)}
    known = {
        *ATTENTION,
        "auto",
        "triton",
        "sdpa",
        "no-cudnn",
        "cublas",
        "cublaslt",
        "cdt",
        "unfused",
        "normrows16",
    }
    unknown = words - launch - known
    if unknown:
        print(
            f"decode_kernels.py: unknown variant word(s) {sorted(unknown)}; see the docstring",
            file=sys.stderr,
        )
        raise SystemExit(2)
    torch._dynamo.reset()
    inductor.coordinate_descent_tuning = "cdt" in words
    inductor.combo_kernels = "combo" in words
    torch.backends.cuda.enable_cudnn_sdp("no-cudnn" not in words)
    torch.backends.cuda.preferred_blas_library("cublaslt" if "cublaslt" in words else "cublas")
    shipped = DecodeOptions()
    block, warps, stages = shipped.attention_launch
    for w in launch:
        value = int(w[2:])
        block, warps, stages = (
            value if w[1] == "b" else block,
            value if w[1] == "w" else warps,
            value if w[1] == "s" else stages,
        )
    options = dataclasses.replace(
        shipped,
        linear_rows=0 if words & {"cublas", "cublaslt"} else shipped.linear_rows,
        fuse="unfused" not in words,
        norm_rows=16 if "normrows16" in words else shipped.norm_rows,
        programs_per_sm=0 if "triton" in words else shipped.programs_per_sm if "auto" in words else math.inf,
        attention_launch=(block, warps, stages),
    )
    return options, next((ATTENTION[w] for w in words if w in ATTENTION), None)


def top_kernels(dec: Decoder, tok, pos, n: int = 20) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            dec.step(tok, pos)
        torch.cuda.synchronize()
    events = [e for e in p.key_averages() if e.device_time_total > 0]
    rows = [(e.key[:90], e.count // 10, round(e.device_time_total / 10, 1)) for e in events]
    rows.sort(key=lambda r: -r[2])
    return [*rows[:n], ("total GPU µs per step", 0, round(sum(r[2] for r in rows), 1))]


@torch.inference_mode()
def run(shape: str, batch: int, variant: str, model: MPTForCausalLM, profile: bool) -> dict:
    options, kernel = configure(variant)
    dec = Decoder(model, batch, 256, compile=True, options=options)
    if kernel is not None:
        dec.decode_plan = AttentionPlan(kernel, f"variant {variant}")
    ids = torch.randint(0, model.config.vocab_size, (batch, 128), device="cuda")
    tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)[:, None]
    pos = torch.full((1,), 128, dtype=torch.long, device="cuda")
    start = time.perf_counter()
    for _ in range(3):
        dec.step(tok, pos)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    compiled = dec.step(tok, pos).clone()
    # the reference: the uncompiled step with SDPA and cuBLAS (it writes the same k/v again)
    kept = dec.blocks, dec.decode_plan, dec.max_rows
    dec.blocks, dec.max_rows = list(model.transformer.blocks), 0
    dec.decode_plan = select(model.config, "decode", device=model.device, options=None)
    max_diff = (compiled - dec._step(tok, pos)).abs().max().item()
    dec.blocks, dec.decode_plan, dec.max_rows = kept
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            tok = dec.step(tok, pos).argmax(-1)[:, None]
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 10)
    row = dict(shape=shape, batch=batch, variant=variant, ms=round(best, 3), compile_s=round(compile_s, 1))
    row["attention"] = dec.decode_plan.kernel.name
    row["max_abs_diff_vs_eager"] = max_diff
    if profile:
        row["kernels"] = top_kernels(dec, tok, pos)
    del dec
    torch.cuda.empty_cache()
    return row


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    rows: list[dict] = []
    models: dict[str, MPTForCausalLM] = {}
    for arg in sys.argv[1:]:
        shape, batch, variant, *flags = arg.split(":")
        if shape not in models:
            models.clear()
            torch.cuda.empty_cache()
            cfg = MPTConfig.from_dict(
                {**SHAPES[shape], "max_seq_len": 2048, "no_bias": True, "attn_config": {"alibi": True}}
            )
            models[shape] = MPTForCausalLM(cfg, device="cuda").to(torch.bfloat16).eval()
        try:
            row = run(shape, int(batch), variant, models[shape], profile="profile" in flags)
        except Exception as e:  # a variant this torch cannot compile: report it, go on
            row = dict(shape=shape, batch=int(batch), variant=variant, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "decode_kernels.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
