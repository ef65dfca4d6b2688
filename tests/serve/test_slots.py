"""The slot decoder's decode step: it reads the first `n_keys` positions of each slot only (its bucket), an idle
row reads one key, and the step through the Triton decode kernel (each row at its own position; Triton's CPU
interpreter) equals the step through SDPA with the per-row bias, which the engine tests check against generate;
a packed prefill of several first chunks writes what one chunk at a time writes."""

from __future__ import annotations

import pytest
import torch

from smalto.kernels import decode_attention
from smalto.serve.slots import SLOT_ATTENTION, SlotDecoder, key_buckets
from tests.model.helpers import use_triton_interpreter
from tests.serve.test_engine import SPECS, make_model

use_triton_interpreter()  # before the kernel is built: it then runs on CPU tensors


def test_key_buckets() -> None:
    assert key_buckets(2048, 2064) == [128, 256, 512, 1024, 2048]
    assert key_buckets(48, 64, smallest=16) == [16, 32, 48]
    assert key_buckets(50, 64, smallest=16) == [16, 32, 64]  # the context rounded up to 16 positions
    assert key_buckets(100, 112) == [112]
    # at most 7 graphs: a long context starts higher
    assert key_buckets(65536, 65552) == [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def filled(min_bucket: int = 16) -> SlotDecoder:
    """Three slots of a 48-position model: slot 0 holds 6 prompt tokens, slot 2 holds 2, slot 1 is idle."""
    dec = SlotDecoder(make_model("alibi"), max_batch=3, compile=False, min_bucket=min_bucket)
    dec.prefill(0, [5, 17, 99, 3, 42, 7], 0)
    dec.prefill(2, [200, 1], 0)
    return dec


@torch.inference_mode()
def test_step_reads_its_bucket_only() -> None:
    dec = filled()
    tokens, pos = torch.tensor([8, 0, 9]), torch.tensor([6, dec.scratch, 2])  # row 1 idle
    saved = [t.clone() for t in dec.cache.keys + dec.cache.values]
    want = dec.step(tokens, pos, 48)
    for t, s in zip(dec.cache.keys + dec.cache.values, saved, strict=True):
        t.copy_(s)
        t[:, :, 16:] = float("nan")  # past the bucket (and the scratch position): never read
    got = dec.step(tokens, pos, 16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-5, rtol=1e-5)
    assert dec.bucket(7) == 16 and dec.bucket(17) == 32 and dec.bucket(48) == 48


@torch.inference_mode()
def test_decode_kernel_step_equals_sdpa_step() -> None:
    assert decode_attention.prepare()
    dec = filled()
    tokens, pos = torch.tensor([8, 0, 9]), torch.tensor([6, dec.scratch, 2])  # row 1 idle
    saved = [t.clone() for t in dec.cache.keys + dec.cache.values]
    want = dec.step(tokens, pos, 16)
    for t, s in zip(dec.cache.keys + dec.cache.values, saved, strict=True):
        t.copy_(s)  # the same cache again
        # the idle row reads its key 0 only, not its slot up to the scratch position
        t[1, :, 1:] = float("nan")
    dec.attention = decode_attention.decode_kernel()
    assert dec.attention is not SLOT_ATTENTION
    got = dec.step(tokens, pos, 16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", list(SPECS))
@torch.inference_mode()
def test_packed_prefill_writes_what_one_chunk_at_a_time_writes(spec: str) -> None:
    """Several first chunks in one packed forward: the same cache rows and last logits as each alone (ALiBi
    distances, RoPE angles and learned positions from each chunk's own position 0)."""
    model = make_model(spec)
    parts = [(2, [5, 17, 99, 3, 42, 7]), (0, [200, 1]), (3, [9, 9, 9, 30, 1, 2, 3, 4, 5])]
    alone = SlotDecoder(model, max_batch=4, compile=False, min_bucket=16)
    want = torch.stack([alone.prefill(slot, ids, 0) for slot, ids in parts])
    packed = SlotDecoder(model, max_batch=4, compile=False, min_bucket=16)
    for t in packed.cache.keys + packed.cache.values:
        t.fill_(float("nan"))  # what is not written stays unread: slot 1, and past each chunk
    got = packed.prefill_packed(parts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(
        alone.cache.keys + alone.cache.values, packed.cache.keys + packed.cache.values, strict=True
    ):
        for slot, ids in parts:
            torch.testing.assert_close(b[slot, :, : len(ids)], a[slot, :, : len(ids)], atol=1e-5, rtol=1e-5)
            assert b[slot, :, len(ids) :].isnan().all()
        assert b[1].isnan().all()
