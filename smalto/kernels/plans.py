"""Which attention kernel each mode runs: chosen once, with the reason, and applied to the model from outside.

    select(config, mode, ...)  → AttentionPlan(kernel, reason[, fallback]) for train | prefill | decode | score
    apply(model, ...)          sets the model's plans for the modes it is given (`MPTModel.plans`)

`attn_impl` is one string; this is the only place that maps it to a kernel and refuses impossible combinations
with the reason (a `ConfigError`):
    eager / sdpa   the reference kernels (smalto/model/attention.py), in every mode
    flex           FlexAttention (flex_attention.py): any mask; no dropout, no CPU backward
    cudnn          cuDNN's flash attention with ALiBi (cudnn_attention.py) for training; inference as `auto`
    auto           training on CUDA: cuDNN when it computes the step, else flex (dropout or CPU: sdpa);
                   decode: the Triton decode kernel (decode_attention.py) when rows × heads fill the GPU, else
                   sdpa; prefill and score: sdpa (flex compiles one kernel per shape, and inference lengths vary)
Training knows its shape at setup (micro-batch, sequence length, dtype), the decoder when it builds its cache
(batch, slots): each selects then, and no forward asks again.
"""

from __future__ import annotations

import torch

from smalto.errors import ConfigError
from smalto.kernels import cudnn_attention, decode_attention
from smalto.kernels.flex_attention import FLEX
from smalto.kernels.options import DecodeOptions
from smalto.model.attention import EAGER, SDPA, AttentionPlan
from smalto.model.config import MPTConfig
from smalto.model.mpt import MODES, MPTForCausalLM


def select(
    config: MPTConfig,
    mode: str,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    seq: int = 1,
    options: DecodeOptions | None = None,
) -> AttentionPlan:
    """The attention plan for `mode` (one of MODES). batch × seq: the training micro-batch, or for decode the rows
    and the cache's slots; dtype: the activations' (bf16 under autocast)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; one of {', '.join(MODES)}")
    impl = config.attn_config.attn_impl
    if impl == "eager":
        return AttentionPlan(EAGER, "attn_impl: eager")
    if impl == "sdpa":
        return AttentionPlan(SDPA, "attn_impl: sdpa")
    if mode == "train":
        return _train(config, impl, device, dtype, batch, seq)
    if mode == "decode" and impl in ("auto", "cudnn"):
        o = options or DecodeOptions()
        why = decode_attention.why_not(
            config.head_dim, seq, batch * config.n_heads, device, o.programs_per_sm
        )
        if why is None:
            return AttentionPlan(
                decode_attention.decode_kernel(o.attention_launch), "rows × heads fill the GPU"
            )
        return AttentionPlan(SDPA, f"not the decode kernel: {why}")
    if impl == "flex":
        return AttentionPlan(FLEX, "attn_impl: flex")
    return AttentionPlan(SDPA, "inference: flex compiles per shape, cuDNN's kernel is training's")


def _train(
    config: MPTConfig, impl: str, device: torch.device, dtype: torch.dtype, batch: int, seq: int
) -> AttentionPlan:
    a = config.attn_config
    dropout = a.attn_pdrop > 0
    if impl == "flex":
        if dropout:
            raise ConfigError(
                "attn_impl 'flex' has no attention dropout; set attn_config.attn_pdrop 0 or use 'sdpa'"
            )
        if device.type != "cuda":
            raise ConfigError("attn_impl 'flex' has no backward on CPU; train on CPU with 'sdpa' (or 'auto')")
        return AttentionPlan(FLEX, "attn_impl: flex")
    cudnn_why = cudnn_attention.why_not(config, device=device, dtype=dtype, batch=batch, seq=seq)
    if impl == "cudnn":
        if cudnn_why is not None:
            raise ConfigError(f"attn_impl 'cudnn' cannot train this model: {cudnn_why}")
        return AttentionPlan(cudnn_attention.CUDNN, "attn_impl: cudnn", fallback=FLEX)
    if device.type != "cuda":
        return AttentionPlan(SDPA, "training on CPU (FlexAttention has no CPU backward)")
    if dropout:
        return AttentionPlan(SDPA, "attention dropout (only sdpa and eager apply it)")
    if a.attn_uses_sequence_id or 0 < a.sliding_window_size < seq:
        return AttentionPlan(FLEX, "packed documents or a window: cuDNN's kernel is plain causal")
    if cudnn_why is not None:
        return AttentionPlan(FLEX, f"cuDNN cannot: {cudnn_why}")
    return AttentionPlan(cudnn_attention.CUDNN, "cuDNN computes this step", fallback=FLEX)


def apply(model: MPTForCausalLM, plans: dict[str, AttentionPlan]) -> MPTForCausalLM:
    """Set the model's plan for each mode given (the model keeps its other modes' plans)."""
    unknown = set(plans) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; one of {', '.join(MODES)}")
    model.transformer.plans.update(plans)
    return model


def apply_inference(model: MPTForCausalLM) -> MPTForCausalLM:
    """The plans a loaded model scores and prefills with, from its config (decode is the decoder's: it knows the
    batch)."""
    dev, dtype = model.device, model.dtype
    return apply(model, {m: select(model.config, m, device=dev, dtype=dtype) for m in ("prefill", "score")})
