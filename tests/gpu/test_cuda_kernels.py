"""CUDA checks, run through the device tool (`pytest -m gpu tests/gpu`); CI deselects them (no GPU there)."""

import copy

import pytest
import torch

from tests.model.helpers import tiny, tokens, with_impl

pytestmark = pytest.mark.gpu

CONFIGS = {
    "alibi": {},
    "rope-gqa": {"attn_config": {"alibi": False, "rope": True, "kv_n_heads": 2}},
    "window-qkln": {"attn_config": {"sliding_window_size": 7, "qk_ln": True}},
    "seqid": {"attn_config": {"attn_uses_sequence_id": True}},
}


def _cuda(model):
    assert torch.cuda.is_available(), "run these on a GPU machine"
    return model.cuda()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_flex_matches_eager_forward_and_gradients_on_cuda(name, compiled):
    # the training plans, chosen on CUDA (FlexAttention has no CPU backward: select refuses it there)
    ref = with_impl(_cuda(tiny(max_seq_len=512, **CONFIGS[name])), "eager", modes=("train",)).train()
    flex = with_impl(copy.deepcopy(ref), "flex", modes=("train",)).train()
    assert flex.transformer.plans["train"].kernel.name == "flex"
    if compiled:
        for block in flex.transformer.blocks:
            block.compile()
    x = tokens(2, 256).cuda()
    seq = (torch.arange(256, device="cuda") // 50).expand(2, -1).contiguous()
    losses = []
    for m in (ref, flex):
        out = m(x, labels=x, sequence_id=seq)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (n, p), (_, q) in zip(ref.named_parameters(), flex.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_bf16_autocast_flex_close_to_eager():
    model = _cuda(tiny(max_seq_len=512)).eval()
    x = tokens(2, 300).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = with_impl(model, "eager", modes=("score",))(x).logits.float()
        flex = with_impl(model, "flex", modes=("score",))
        assert flex.transformer.plans["score"].kernel.name == "flex"
        got = flex(x).logits.float()
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()
