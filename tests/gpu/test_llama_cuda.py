"""LLaMA folders on CUDA: the compiled decode step (a CUDA graph, RoPE applied at the step's position on the
device, `dynamic` scaling's θ computed there too) picks transformers' greedy tokens; in bf16 the decode kernels
(Triton decode attention, fused RMSNorm / SwiGLU decode block) run and stay close to the eager step.
Run on a GPU: `pytest -m gpu tests/gpu/test_llama_cuda.py`."""

import pytest
import torch

import smalto
from smalto.generate import generate
from tests.test_llama import hf_model

pytestmark = pytest.mark.gpu

SCALINGS = [
    None,
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
]  # fmt: skip


@pytest.mark.parametrize("scaling", SCALINGS, ids=["plain", "dynamic", "llama3"])
def test_compiled_decode_equals_transformers_greedy(scaling, tmp_path):
    ref = hf_model(rope_scaling=dict(scaling) if scaling else None).cuda()
    ref.save_pretrained(tmp_path)
    ours = smalto.load(tmp_path, device="cuda", max_seq_len=64)  # dynamic: past the pretrained 32 positions
    prompts = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    want = ref.generate(prompts.cuda(), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = generate(
        ours, None, prompts.tolist(), max_new_tokens=40, temperature=0, compile=True, eos_token_id=[]
    )
    assert ours.__dict__["_smalto_decoder"].compiled
    for row, out in enumerate(outs):
        assert out.token_ids == want[row, 12:].tolist()


def test_bf16_decode_kernels_follow_the_eager_step(tmp_path):
    hf_model(num_key_value_heads=2).save_pretrained(tmp_path)
    model = smalto.load(tmp_path, device="cuda", dtype="bf16")
    prompts = torch.randint(0, 300, (16, 10), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(max_new_tokens=8, temperature=0, eos_token_id=[])
    fast = generate(model, None, prompts, compile=True, **kw)
    slow = generate(model, None, prompts, compile=False, **kw)
    agree = sum(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(fast, slow, strict=True))
    assert agree >= 14  # bf16: a near-tie may flip a row's argmax; the kernels must not change the model
