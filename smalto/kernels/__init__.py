"""Fast paths applied to the plain model from outside; the model (smalto/model/) never imports them.

    plans.py           which attention kernel each mode runs (`select`), set on a model by `apply`
    flex_attention.py  FlexAttention: ALiBi as a score_mod, any mask as a block mask (training)
    cudnn_attention.py cuDNN's flash attention with ALiBi (training on Hopper; optional package)
    decode_attention.py one query per row against the KV cache, in Triton (batched decoding)
    decode_linear.py   (+ _kernel.py) the decode step's skinny products, with norm / activation / residual fused
    decode_block.py    a block's decode step in those fused products (the decoder swaps it in)
    options.py         `DecodeOptions`: how the decode step uses the kernels
    gelu.py            the exact GELU with a polynomial erf (bf16 training)
    loss.py            the cross-entropy with the float32 upcast fused (CUDA training)
Triton and cuDNN are imported only when a kernel is built, never by `import smalto.kernels`.
"""

from smalto.kernels.options import DecodeOptions
from smalto.kernels.plans import apply, apply_inference, select

__all__ = ["DecodeOptions", "apply", "apply_inference", "select"]
