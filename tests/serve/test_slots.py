"""The slot decoder's decode step through the Triton decode kernel (each row at its own position; Triton's CPU
interpreter) equals the step through SDPA with the per-row bias, which the engine tests check against generate."""

from __future__ import annotations

import torch

from smalto.kernels import decode_attention
from smalto.serve.slots import SLOT_ATTENTION, SlotDecoder
from tests.model.helpers import use_triton_interpreter
from tests.serve.test_engine import make_model

use_triton_interpreter()  # before the kernel is built: it then runs on CPU tensors


@torch.inference_mode()
def test_decode_kernel_step_equals_sdpa_step() -> None:
    assert decode_attention.prepare()
    dec = SlotDecoder(make_model("alibi"), max_batch=3, compile=False)
    dec.prefill(0, [5, 17, 99, 3, 42, 7], 0)
    dec.prefill(2, [200, 1], 0)
    tokens, pos = torch.tensor([8, 0, 9]), torch.tensor([6, dec.scratch, 2])  # row 1 idle
    keys = [k.clone() for k in dec.cache.keys]
    want = dec.step(tokens, pos)
    dec.cache.keys = keys  # the same cache again (the step rewrote its own positions only)
    dec.attention = decode_attention.decode_kernel()
    assert dec.attention is not SLOT_ATTENTION
    got = dec.step(tokens, pos)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-4, rtol=1e-4)
