"""cuDNN's ALiBi attention (smalto/kernels/cudnn_attention.py) against the eager reference, on CUDA; and the
training plans `select` makes with it.

Needs the optional `cudnn` package (nvidia-cudnn-frontend): on the GPU box, `python3 -m pip install --no-deps
.whl/nvidia_cudnn_frontend-*.whl` from a carried wheel. Without it these tests fail, they do not skip.
"""

import copy

import pytest
import torch

from smalto.errors import ConfigError
from smalto.kernels import apply, cudnn_attention, select
from smalto.kernels.gelu import use_poly_gelu
from smalto.model.attention import AttentionMask, alibi_slopes, eager_attention
from tests.model.helpers import tiny, tokens

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _needs_cudnn():
    assert torch.cuda.is_available(), "run these on a GPU machine"
    assert cudnn_attention.available(), cudnn_attention.MISSING


def _qkv(B, H, K, T, D, seed=0):
    """The packed (B, T, (H + 2K)·D) projection, rows Q | K | V, as the model makes it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(B, T, (H + 2 * K) * D, device="cuda", generator=g).bfloat16().requires_grad_()


def _train_plan(model, impl: str, batch: int, seq: int):
    """Set `attn_impl` and apply the training plan `select` makes for a bf16-autocast step of (batch, seq)."""
    model.config.attn_config.attn_impl = impl
    plan = select(model.config, "train", device=CUDA, dtype=torch.bfloat16, batch=batch, seq=seq)
    return apply(model, {"train": plan})


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
    use_poly_gelu(ref)  # as bf16 training builds the model (smalto/train/parallel.py)
    models = {
        "flex": _train_plan(ref, "flex", 2, 256),
        "cudnn": _train_plan(copy.deepcopy(ref), "cudnn", 2, 256),
    }
    assert models["cudnn"].transformer.plans["train"].kernel.name == "cudnn"
    assert models["flex"].transformer.plans["train"].kernel.name == "flex"
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
    """`auto`'s plans send a training forward through cuDNN's op (seen by the profiler), inference through others."""
    m = tiny(max_seq_len=256, n_heads=4, d_model=128).cuda()
    m.config.attn_config.attn_impl = "auto"
    shape = dict(device=CUDA, dtype=torch.bfloat16, batch=2, seq=64)
    plans = {mode: select(m.config, mode, **shape) for mode in ("train", "score", "prefill")}
    assert plans["train"].kernel.name == "cudnn" and plans["train"].fallback.name == "flex"
    assert plans["score"].kernel.name == plans["prefill"].kernel.name == "sdpa"
    apply(m, plans)

    def ops(train: bool) -> set[str]:
        m.train(train)
        amp = torch.autocast("cuda", dtype=torch.bfloat16)
        with torch.profiler.profile() as prof, amp, torch.set_grad_enabled(train):
            m(tokens(2, 64).cuda())
        return {e.name for e in prof.events()}

    assert "smalto::cudnn_attention_fwd" in ops(True)
    assert "smalto::cudnn_attention_fwd" not in ops(False)


def test_a_padded_batch_takes_the_fallback():
    """cuDNN's kernel is plain causal from position 0: a training batch with padding runs the plan's FlexAttention
    and still gives eager's loss."""
    m = tiny(max_seq_len=256, n_heads=4, d_model=128).cuda().train()
    ref = copy.deepcopy(m)
    _train_plan(m, "auto", 2, 64)
    x = tokens(2, 64).cuda()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :9] = False
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.profiler.profile() as prof:
            loss = m(x, attention_mask=mask, labels=x).loss
        want = ref(x, attention_mask=mask, labels=x).loss  # the reference plan (eager: tiny's attn_impl)
    assert "smalto::cudnn_attention_fwd" not in {e.name for e in prof.events()}
    torch.testing.assert_close(loss.float(), want.float(), atol=2e-2, rtol=1e-2)


def test_other_bias_max_is_refused_by_name():
    config = tiny(max_seq_len=256, attn_config={"alibi_bias_max": 4}).config
    config.attn_config.attn_impl = "cudnn"
    with pytest.raises(ConfigError, match="alibi_bias_max 8, not 4"):
        select(config, "train", device=CUDA, dtype=torch.bfloat16, batch=1, seq=32)
    config.attn_config.attn_impl = "auto"  # auto trains with FlexAttention instead, and says why
    plan = select(config, "train", device=CUDA, dtype=torch.bfloat16, batch=1, seq=32)
    assert plan.kernel.name == "flex" and "alibi_bias_max 8, not 4" in plan.reason
