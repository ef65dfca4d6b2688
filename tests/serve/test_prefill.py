"""The packed prefill padded to a token bucket (what its CUDA graphs run) computes what it computes at its own size:
the same last logits and the same cache rows, and its padding writes nothing a sequence reads (only the scratch
position of slot 0)."""

from __future__ import annotations

import pytest
import torch

from smalto.serve.prefill import GRAPH_MAX_TOKENS, token_buckets
from smalto.serve.slots import SlotDecoder
from tests.serve.test_engine import SPECS, make_model


def test_token_buckets() -> None:
    assert token_buckets(2048) == [64, 96, 144, 224, 336, 512, 768, 1152, 1728, 2048]
    assert token_buckets(100) == [64, 96, 112]  # the largest: the budget rounded up to 16 tokens
    assert token_buckets(30) == [32]
    assert token_buckets(1 << 20)[-1] == GRAPH_MAX_TOKENS
    for a, b in zip(token_buckets(8192), token_buckets(8192)[1:], strict=False):
        assert a % 16 == 0 and b <= 1.5 * a + 16  # padding wastes at most about a third


@pytest.mark.parametrize("spec", list(SPECS))
@torch.inference_mode()
def test_padded_packed_prefill_equals_its_own_size(spec: str) -> None:
    model = make_model(spec)
    parts = [(2, [5, 17, 99, 3, 42, 7]), (0, [200, 1]), (3, [9, 9, 9, 30, 1, 2, 3, 4, 5])]
    exact = SlotDecoder(model, max_batch=4, compile=False, min_bucket=16)
    want = exact.prefill_packed(parts)
    padded = SlotDecoder(model, max_batch=4, compile=False, min_bucket=16)
    for t in padded.cache.keys + padded.cache.values:
        t.fill_(float("nan"))
    p = padded.packed
    T, R = 32, 4  # 17 tokens padded to 32, three rows to four
    got = p.forward(p._inputs(parts, T, R), T, R)
    assert got.shape == (R, model.config.vocab_size)
    torch.testing.assert_close(got[:3], want, atol=1e-5, rtol=1e-5)
    scratch = padded.scratch
    for a, b in zip(
        exact.cache.keys + exact.cache.values, padded.cache.keys + padded.cache.values, strict=True
    ):
        for slot, ids in parts:
            torch.testing.assert_close(b[slot, :, : len(ids)], a[slot, :, : len(ids)], atol=1e-5, rtol=1e-5)
            assert b[slot, :, len(ids) : scratch].isnan().all()
        assert b[1].isnan().all()
        assert not b[0, :, scratch].isnan().any()  # the padding's keys: slot 0's scratch position only
