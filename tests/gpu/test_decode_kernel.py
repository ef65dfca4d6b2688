"""The Triton decode-attention kernel equals the eager reference, and `select` gives decode steps the kernel only
where rows × heads fill the GPU (run on a GPU: `pytest -m gpu tests/gpu`)."""

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from smalto.generate import generate
from smalto.kernels import DecodeOptions, select
from smalto.kernels import decode_attention as decode_kernel
from smalto.model.attention import AttentionMask, alibi_slopes, eager_attention
from smalto.model.config import MPTConfig
from tests.model.helpers import tiny, tokens, with_impl

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _kernel_built():
    assert decode_kernel.prepare(), "the decode kernel needs Triton"


@pytest.mark.parametrize(
    "B,H,K,S,D,window,pad,alibi",
    [
        (2, 4, 4, 100, 64, -1, False, True),
        (3, 4, 2, 130, 112, -1, True, True),  # MPT-30B's head dim (not a power of two), GQA
        (2, 4, 1, 300, 128, 70, True, True),  # MQA, a window, padding longer than a block
        (2, 4, 2, 200, 128, -1, True, False),  # RoPE models: no ALiBi
    ],
)
def test_kernel_equals_eager(B, H, K, S, D, window, pad, alibi):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, n, t, D, device="cuda", generator=g) for n, t in ((H, 1), (K, S), (K, S)))
    q_pos = torch.tensor([S - 50], device="cuda")
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    if pad:
        for b in range(B):
            valid[b, : b * 90] = False
    mask = AttentionMask(q_pos=q_pos, n_keys=S, key_valid=valid, window=window)
    slopes = alibi_slopes(H, device="cuda") if alibi else None
    ref = eager_attention(q, k, v, mask, slopes, 1 / math.sqrt(D), 0.0)
    got = decode_kernel.decode_attention(q, k, v, q_pos, slopes, valid, 1 / math.sqrt(D), window)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"attn_config": {"alibi": False, "rope": True, "kv_n_heads": 2}}])
def test_compiled_generation_with_the_kernel_equals_eager_generation(overrides):
    model = tiny(max_seq_len=256, **overrides).cuda()
    prompts = [tokens(1, 20)[0].tolist(), tokens(1, 7, seed=3)[0].tolist()]  # left padding in the batch
    kw = dict(max_new_tokens=24, temperature=0)  # no tokenizer: no EOS, every row runs to the end
    use_it = DecodeOptions(programs_per_sm=0)  # the tiny batch: use the kernel anyway
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast = generate(with_impl(model, "auto"), None, prompts, compile=True, options=use_it, **kw)
    decoder = model.__dict__["_smalto_decoder"]
    assert decoder.decode_plan.kernel.name == "decode", decoder.decode_plan.reason
    assert decoder.compiled  # no fallback to the eager step (it warns and goes on)
    assert any("decode_attention_kernel" in e.key for e in prof.key_averages()), "auto did not use the kernel"
    ref = generate(with_impl(model, "eager"), None, prompts, compile=False, **kw)
    assert model.__dict__["_smalto_decoder"].decode_plan.kernel.name == "eager"
    assert [c.token_ids for c in fast] == [c.token_ids for c in ref]


def test_auto_decodes_with_the_kernel_only_when_rows_times_heads_fill_the_gpu():
    cuda = torch.device("cuda")
    sms = torch.cuda.get_device_properties(cuda).multi_processor_count  # an H100: 132
    # MPT-7B's attention shape (32 heads of 128); the config only, no weights
    shape = {"d_model": 4096, "n_heads": 32, "n_layers": 1, "vocab_size": 128, "max_seq_len": 256}
    config = MPTConfig.from_dict({**shape, "attn_config": {"alibi": True, "attn_impl": "auto"}})
    assert config.head_dim == 128

    def plan(mode: str, batch: int, impl: str = "auto", options: DecodeOptions | None = None):
        config.attn_config.attn_impl = impl
        return select(config, mode, device=cuda, dtype=torch.bfloat16, batch=batch, seq=256, options=options)

    assert plan("decode", 16).kernel.name == "decode"  # MPT-7B at batch 16: 512 (row, head) programs
    batch_1 = plan("decode", 1)  # MPT-7B at batch 1: 32 programs, SDPA is faster
    assert batch_1.kernel.name == "sdpa" and f"{sms} SMs" in batch_1.reason
    assert plan("decode", 1, options=DecodeOptions(programs_per_sm=0)).kernel.name == "decode"
    assert plan("decode", math.ceil(sms / 32)).kernel.name == "decode"  # the first batch that fills every SM
    assert plan("decode", math.ceil(sms / 32) - 1).kernel.name == "sdpa"
    assert plan("prefill", 4 * sms).kernel.name == "sdpa"  # a prefill
    assert plan("decode", 16, impl="sdpa").kernel.name == "sdpa"  # asked for by name
