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
