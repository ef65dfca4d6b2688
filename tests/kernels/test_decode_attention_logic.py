"""The Triton decode-attention kernel's logic, run on CPU through Triton's interpreter (`TRITON_INTERPRET=1`):
equal to the eager reference, and traceable by torch.compile with `fullgraph=True` (a compiled decode step that
could not trace it would fall back to eager decoding). The GPU itself: tests/gpu/test_decode_kernel.py."""

import math

import pytest
import torch

from smalto.kernels import decode_attention as decode_kernel
from smalto.model.attention import AttentionMask, AttentionPlan, alibi_slopes, eager_attention
from smalto.model.cache import KVCache
from tests.model.helpers import tiny, tokens, use_triton_interpreter, with_impl

use_triton_interpreter()  # before the kernel is built (prepare() in the fixture): it then runs on CPU tensors


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert decode_kernel.prepare()


@pytest.mark.parametrize(
    "B,H,K,S,D,q_at,window,pad,alibi",
    [
        (2, 4, 4, 100, 64, 93, -1, 0, True),
        (3, 4, 2, 130, 112, 80, -1, 11, True),  # head dim 112 (MPT-30B), GQA, left padding
        (2, 4, 1, 300, 128, 250, 70, 200, True),  # MQA, a window, padding longer than a 64-slot block
        (2, 2, 2, 200, 32, 199, -1, 90, False),  # no ALiBi (RoPE models)
        (1, 2, 2, 64, 16, 0, -1, 0, True),  # the first position: one visible key
    ],
)
def test_kernel_equals_eager(B, H, K, S, D, q_at, window, pad, alibi):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, 1), (K, S), (K, S)))
    q_pos = torch.tensor([q_at])
    valid = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        valid[b, : b * pad] = False
    mask = AttentionMask(q_pos=q_pos, n_keys=S, key_valid=valid, window=window)
    slopes = alibi_slopes(H) if alibi else None
    ref = eager_attention(q, k, v, mask, slopes, 1 / math.sqrt(D), 0.0)
    got = decode_kernel.decode_attention(q, k, v, q_pos, slopes, valid, 1 / math.sqrt(D), window)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_kernel_with_a_position_per_row_equals_eager_row_by_row():
    B, H, K, S, D = 3, 4, 2, 100, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, 1), (K, S), (K, S)))
    q_pos = torch.tensor([5, 99, 0])  # the serve engine's slots: every row at its own position
    slopes = alibi_slopes(H)
    got = decode_kernel.decode_attention(q, k, v, q_pos, slopes, None, 1 / math.sqrt(D))
    for b in range(B):
        mask = AttentionMask(q_pos=q_pos[b : b + 1], n_keys=S)
        ref = eager_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask, slopes, 1 / math.sqrt(D), 0.0)
        torch.testing.assert_close(got[b : b + 1], ref, atol=1e-5, rtol=1e-5)


def test_a_decode_step_through_the_kernel_compiles_in_one_graph():
    model = with_impl(tiny(max_seq_len=64), "sdpa")
    cache = KVCache.for_model(model.config, 2, 48, torch.float32, "cpu")
    ids = tokens(2, 10)
    plan = AttentionPlan(decode_kernel.decode_kernel(), "test")
    with torch.no_grad():
        model.transformer(ids, None, None, cache, None)
        pos = torch.tensor([10])
        ref = model.transformer(ids[:, :1], None, None, cache, pos)  # SDPA
        step = torch.compile(
            lambda t, p: model.transformer(t, None, None, cache, p, plan), backend="eager", fullgraph=True
        )
        got = step(ids[:, :1], pos)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_the_kernel_is_for_cuda_only():
    assert decode_kernel.why_not(128, 256, 512, torch.device("cpu"), 1.0) == "it runs on CUDA only"
