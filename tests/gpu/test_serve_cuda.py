"""The serving engine on CUDA: its compiled, CUDA-graph decode step (one graph per key-length bucket, smalto's decode
kernels inside) gives each request the greedy tokens of `smalto generate`, whatever else is in the batch (run on a
GPU: `pytest -m gpu tests/gpu`)."""

import pytest
import torch

from smalto.generate import generate
from smalto.model.mpt import MPTForCausalLM
from smalto.serve.engine import Engine
from tests.helpers import tiny_config
from tests.serve.test_engine import MAX_NEW, PROMPTS, SPECS, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("spec", ["alibi", "rope_gqa"])
def test_compiled_engine_equals_generate_with_arrivals_mid_flight(spec: str) -> None:
    torch.manual_seed(0)
    # float32 with TF32 off: the batched graph and the one-row eager decode take the same values to each argmax
    model = MPTForCausalLM(tiny_config(max_seq_len=48, **SPECS[spec])).eval().cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(temperature=0, eos_token_id=[], compile=False)
    want = [
        generate(model, None, [p], max_new_tokens=n, **kw)[0].token_ids
        for p, n in zip(PROMPTS, MAX_NEW, strict=True)
    ]
    engine = Engine(model, None, max_batch=4, prefill_chunk=4, min_bucket=16)
    assert engine.dec.compiled
    engine.warmup()
    outs = run(engine, {0: [0, 1, 2], 2: [3], 5: [4], 9: [5]})
    assert engine.dec.compiled, "the compiled step fell back to eager decoding"
    assert [[t for o in out for t in o.token_ids] for out in outs] == want
    assert engine.busy() == 0


@pytest.mark.parametrize("spec", ["alibi", "rope_gqa", "learned_pos"])
@torch.inference_mode()
def test_captured_packed_prefill_equals_eager(spec: str) -> None:
    """The packed prefill replayed from its CUDA graphs (padded to a token bucket) writes the cache rows and gives
    the last logits of the eager forward at its own size, for one chunk, several, and one past the first bucket."""
    from smalto.serve.slots import SlotDecoder

    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_config(max_seq_len=128, **SPECS[spec])).eval().cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    graphed = SlotDecoder(model, max_batch=4, compile=True, min_bucket=16, prefill_tokens=128)
    graphed.packed.capture()
    assert sorted(graphed.packed.graphs) == [64, 96, 128]
    eager = SlotDecoder(model, max_batch=4, compile=False, min_bucket=16)
    long = [(i * 7) % 250 + 1 for i in range(70)]
    for parts in (
        [(2, PROMPTS[0])],
        [(2, PROMPTS[0]), (0, PROMPTS[1]), (3, PROMPTS[2])],
        [(1, long), (3, [4, 5])],
    ):
        got, want = graphed.prefill_packed(parts), eager.prefill_packed(parts)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for a, b in zip(
            eager.cache.keys + eager.cache.values, graphed.cache.keys + graphed.cache.values, strict=True
        ):
            for slot, ids in parts:
                torch.testing.assert_close(
                    b[slot, :, : len(ids)], a[slot, :, : len(ids)], atol=1e-4, rtol=1e-4
                )
