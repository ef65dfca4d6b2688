"""cuDNN's ALiBi attention (smalto/model/cudnn_attention.py) against the eager reference, on CUDA.

Needs the optional `cudnn` package (nvidia-cudnn-frontend): on the GPU box, `python3 -m pip install --no-deps
.whl/nvidia_cudnn_frontend-*.whl` from a carried wheel. Without it these tests fail, they do not skip.
"""

import copy

import pytest
import torch

from smalto.errors import ConfigError
from smalto.model import cudnn_attention
from smalto.model.attention import AttentionMask, alibi_slopes, eager_attention
from tests.model.helpers import tiny, tokens, with_impl

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cudnn():
    assert torch.cuda.is_available(), "run these on a GPU machine"
    assert cudnn_attention.available(), cudnn_attention.MISSING


def _qkv(B, H, K, T, D, seed=0):
    """The packed (B, T, (H + 2K)·D) projection, rows Q | K | V, as the model makes it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(B, T, (H + 2 * K) * D, device="cuda", generator=g).bfloat16().requires_grad_()


@pytest.mark.parametrize(
    "B,H,K,T,D,alibi",
    [
        (2, 16, 16, 512, 128, True),  # the MPT-1B head shape
        (2, 12, 12, 300, 64, True),  # 12 heads: not a power of two (MPT-125M), a length off the tile size
        (2, 8, 2, 256, 64, True),  # GQA
        (1, 4, 4, 128, 64, False),  # no positional bias (RoPE models)
    ],
)
def test_forward_and_gradients_match_eager(B, H, K, T, D, alibi):
    scale = D**-0.5
    qkv = _qkv(B, H, K, T, D)
    out = cudnn_attention.cudnn_attention(qkv, H, K, alibi, scale)
    assert out.shape == (B, H, T, D)
    grad = torch.randn_like(out)
    out.backward(grad)
    got_grad = qkv.grad.float()

    ref_qkv = qkv.detach().float().requires_grad_()
    rq, rk, rv = (t.view(B, T, -1, D).transpose(1, 2) for t in ref_qkv.split([H * D, K * D, K * D], -1))
    mask = AttentionMask(q_pos=torch.arange(T, device="cuda"), n_keys=T, from_zero=True)
    slopes = alibi_slopes(H, 8, device="cuda") if alibi else None
    ref = eager_attention(rq, rk, rv, mask, slopes, scale, 0.0)
    ref.backward(grad.float())
    # bf16 inputs and outputs: errors of a few bf16 ulps of the values' scale
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_grad, ref_qkv.grad, atol=5e-2, rtol=5e-2)
    assert (got_grad - ref_qkv.grad).abs().mean() < 2e-3


@pytest.mark.parametrize(
    "attn",
    [
        {},  # q, k, v straight from Wqkv: the projection goes to cuDNN as it is
        {"qk_ln": True},  # normed q, k: packed again before the kernel
        {"alibi": False, "rope": True},
        {"kv_n_heads": 2},  # GQA
    ],
)
def test_training_step_cudnn_equals_flex_in_compiled_blocks(attn):
    """A bf16 training step through compiled blocks: cuDNN and FlexAttention give the same loss and gradients."""
    ref = tiny(max_seq_len=512, n_heads=4, d_model=128, attn_config=attn).cuda().train()
    models = {"flex": with_impl(ref, "flex"), "cudnn": with_impl(copy.deepcopy(ref), "cudnn")}
    x = tokens(2, 256).cuda()
    losses, grads = {}, {}
    for name, m in models.items():
        for block in m.transformer.blocks:
            block.compile()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x, labels=x).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert abs(losses["cudnn"] - losses["flex"]) < 2e-3, losses
    cos = torch.nn.functional.cosine_similarity(grads["cudnn"], grads["flex"], dim=0)
    assert cos > 0.999, cos


def test_auto_takes_cudnn_for_training_and_not_for_inference():
    """`auto` sends a training forward through cuDNN's op (seen by the profiler), generation through the others."""
    m = with_impl(tiny(max_seq_len=256, n_heads=4, d_model=128), "auto").cuda()

    def ops(train: bool) -> set[str]:
        m.train(train)
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
        with torch.profiler.profile() as prof, amp, torch.set_grad_enabled(train):
            m(tokens(2, 64).cuda())
        return {e.name for e in prof.events()}

    assert "smalto::cudnn_attention_fwd" in ops(True)
    assert "smalto::cudnn_attention_fwd" not in ops(False)


def test_other_bias_max_is_refused_by_name():
    m = with_impl(tiny(max_seq_len=256, attn_config={"alibi_bias_max": 4}), "cudnn").cuda().train()
    with (
        torch.autocast("cuda", dtype=torch.bfloat16),
        pytest.raises(ConfigError, match="alibi_bias_max 8, not 4"),
    ):
        m(tokens(1, 32).cuda())
