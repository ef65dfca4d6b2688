"""Which kernels a compiled decode step should use: the step timed with its attention / linears swapped.

    python bench/decode_kernels.py 1b:1:sdpa:profile 1b:1:triton 7b:16:sdpa 7b:16:triton 7b:16:reductions
    (each argument SHAPE:BATCH:VARIANT[:profile]; variant words combine with '+', e.g. auto+cublas)

The decode step is smalto's (`smalto.generate.Decoder`: static per-layer KV cache of 256 slots, compiled with
`mode="reduce-overhead"` into a CUDA graph) on a random-weight bf16 model after a 128-token prefill; only the
decode attention (the `sdpa_attention` the model calls) or the linear layers' kernel are replaced:

    auto             what `attn_impl: auto` runs: the Triton kernel when batch × heads ≥ the SM count, else SDPA
    sdpa             F.scaled_dot_product_attention with the ALiBi+mask bias (cuDNN / cutlass)
    triton           smalto's Triton decode kernel (smalto/model/decode_attention.py), at any batch
    no-cudnn         the same with PyTorch's cuDNN attention backend switched off
    flex-decoding    FlexAttention (its split-KV decoding kernel for one query) with ALiBi and the mask as a score_mod
    matmul           q·kᵀ and p·v as batched matmuls, softmax between (three kernels)
    reductions       q·kᵀ and p·v as elementwise-multiply + sum, left to inductor to fuse into reductions
    cublas           the linears (and the unembedding) on cuBLAS instead of smalto's decode-linear kernel
                     (smalto/model/decode_linear.py, what ships)
    unfused          that kernel, without the norms, activation and residual adds fused into it (FUSE = False)
    normrows16       the norms fused on up to 16 rows too (NORM_ROWS = 16; shipped: 1)
    pdl              that kernel launched with programmatic dependent launch (PDL = True; shipped: off)
    combo            inductor's horizontal fusion of independent kernels (combo_kernels), e.g. the K and V cache
                     writes of a layer in one launch
    cublaslt         cublas, with PyTorch's preferred BLAS library set to cuBLASLt (other kernel heuristics)
    cdt              inductor's coordinate-descent tuning of its own kernels
    kb32, kw8, ks2   the Triton decode kernel's launch: slots per loop step (BLOCK), warps, pipeline stages
                     (defaults in decode_attention.LAUNCH), e.g. 7b:16:triton+kb128+kw8

Each row: ms per step (best of 3 × 100 replays), compile seconds, the largest |Δ| of the logits against the
uncompiled step with SDPA and cuBLAS, and with `:profile` the per-step GPU time of the top kernels and the
decode-linear configurations the autotuner chose. Output: JSON lines, and
decode_kernels.json in $OUT when set. Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import smalto.model.decode_attention as decode_kernel
import smalto.model.decode_linear as decode_linear
import torch

import smalto.model.attention as attention
from smalto.generate import Decoder
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

SHAPES = {
    "1b": dict(d_model=2048, n_heads=16, n_layers=24, vocab_size=50432),
    "7b": dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432),
}
SDPA = attention.sdpa_attention
AUTO_THRESHOLD = decode_kernel.PROGRAMS_PER_SM
MAX_ROWS = decode_linear.MAX_ROWS
NORM_ROWS = decode_linear.NORM_ROWS
LAUNCH = dict(decode_kernel.LAUNCH)


def matmul_attention(q, k, v, mask, slopes, scale, dropout_p, bias):
    if q.shape[2] != 1 or bias is None:
        return SDPA(q, k, v, mask, slopes, scale, dropout_p, bias)
    s = (q @ k.transpose(-2, -1)).float() * scale + bias.float()
    return s.softmax(-1).to(q.dtype) @ v


def reduction_attention(q, k, v, mask, slopes, scale, dropout_p, bias):
    if q.shape[2] != 1 or bias is None:
        return SDPA(q, k, v, mask, slopes, scale, dropout_p, bias)
    s = (q.float() * k.float()).sum(-1) * scale + bias[:, :, 0].float()  # (B, H, S)
    return (s.softmax(-1)[..., None] * v.float()).sum(-2, keepdim=True).to(q.dtype)  # (B, H, 1, D)


def flex_decoding_attention(q, k, v, mask, slopes, scale, dropout_p, bias):
    if q.shape[2] != 1:
        return SDPA(q, k, v, mask, slopes, scale, dropout_p, bias)
    from torch.nn.attention.flex_attention import flex_attention

    q_pos, valid = mask.q_pos, mask.key_valid

    def score_mod(score, b, h, q_idx, kv_idx):
        qp = q_pos[q_idx]
        ok = (kv_idx <= qp) & (valid[b, kv_idx] | (kv_idx == qp))
        return torch.where(ok, score + slopes[h] * (kv_idx - qp).to(score.dtype), -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


ATTENTION = {
    "matmul": matmul_attention,
    "reductions": reduction_attention,
    "flex-decoding": flex_decoding_attention,
}


def configure(variant: str, model: MPTForCausalLM | None = None) -> None:
    import torch._inductor.config as inductor

    words = set(variant.split("+"))
    launch = {w for w in words if re.fullmatch(r"k[bws]\d+", w)}
    unknown = (
        words
        - launch
        - {
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
            "pdl",
            "combo",
        }
    )
    if unknown:
        print(
            f"decode_kernels.py: unknown variant word(s) {sorted(unknown)}; see the docstring",
            file=sys.stderr,
        )
        raise SystemExit(2)
    torch._dynamo.reset()
    decode_kernel.prepare(torch.device("cuda"))
    decode_kernel.LAUNCH = dict(LAUNCH)
    for w in launch:
        decode_kernel.LAUNCH[{"b": "BLOCK", "w": "num_warps", "s": "num_stages"}[w[1]]] = int(w[2:])
    decode_kernel.PROGRAMS_PER_SM = 0 if "triton" in words else AUTO_THRESHOLD if "auto" in words else 1 << 30
    if model is not None:
        model.config.attn_config.attn_impl = "auto"
    inductor.coordinate_descent_tuning = "cdt" in words
    inductor.combo_kernels = "combo" in words
    attention.sdpa_attention = next((ATTENTION[w] for w in words if w in ATTENTION), SDPA)
    torch.backends.cuda.enable_cudnn_sdp("no-cudnn" not in words)
    decode_linear.prepare()
    decode_linear.MAX_ROWS = 0 if words & {"cublas", "cublaslt"} else MAX_ROWS
    decode_linear.FUSE = "unfused" not in words
    decode_linear.NORM_ROWS = 16 if "normrows16" in words else NORM_ROWS
    decode_linear.PDL = "pdl" in words
    torch.backends.cuda.preferred_blas_library("cublaslt" if "cublaslt" in words else "cublas")


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
    configure(variant, model)
    dec = Decoder(model, batch, 256, compile=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, 128), device="cuda")
    tok = dec.prefill(ids, torch.ones_like(ids, dtype=torch.bool)).argmax(-1)[:, None]
    pos = torch.full((1,), 128, dtype=torch.long, device="cuda")
    start = time.perf_counter()
    for _ in range(3):
        dec.step(tok, pos)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    compiled = dec.step(tok, pos).clone()
    attention.sdpa_attention, swapped = SDPA, attention.sdpa_attention
    threshold, decode_kernel.PROGRAMS_PER_SM = decode_kernel.PROGRAMS_PER_SM, 1 << 30
    rows, decode_linear.MAX_ROWS = decode_linear.MAX_ROWS, 0
    max_diff = (compiled - dec._step(tok, pos)).abs().max().item()  # the step writes the same k/v again
    decode_kernel.PROGRAMS_PER_SM, decode_linear.MAX_ROWS = threshold, rows
    attention.sdpa_attention = swapped
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            tok = dec.step(tok, pos).argmax(-1)[:, None]
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 10)
    row = dict(shape=shape, batch=batch, variant=variant, ms=round(best, 3), compile_s=round(compile_s, 1))
    row["max_abs_diff_vs_eager"] = max_diff
    if profile:
        row["kernels"] = top_kernels(dec, tok, pos)
        row["decode_linear_configs"] = decode_linear.tuned()
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
    configure("sdpa")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "decode_kernels.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
