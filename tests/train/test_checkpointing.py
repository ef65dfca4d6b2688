"""`train.activation_checkpointing: selective`: the same loss and gradients as full and no checkpointing, and the
backward's recompute runs no attention forward (smalto/train/checkpointing.py)."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

from smalto.adapters import LoraConfig
from smalto.adapters.lora import adapters
from smalto.train.checkpointing import attention_ops
from smalto.train.parallel import build_model, init_world
from tests.helpers import tiny_config

# SDPA with ALiBi: the additive bias goes to SDPA's CPU flash kernel, one op per block
CFG = tiny_config(n_layers=2, no_bias=True, attn_config={"alibi": True, "attn_impl": "sdpa"})
FOUR = ["Wqkv", "out_proj", "up_proj", "down_proj"]
SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _model(ac, *, lora: bool, compile: bool = False):
    cfg = LoraConfig(r=4, alpha=8, targets=FOUR) if lora else None
    model = build_model(
        CFG, init_world("cpu"), seed=5, activation_checkpointing=ac, compile=compile, lora=cfg
    )
    with torch.no_grad():  # B starts at zero: give the adapters an update, so A's gradient is not zero either
        for k, a in enumerate(adapters(model)):
            a.lora_B.weight.copy_(
                torch.randn(a.lora_B.weight.shape, generator=torch.Generator().manual_seed(k))
            )
    return model


def _loss_and_grads(model, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.detach(), grads


IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lora", [False, True])
def test_selective_equals_full_and_no_checkpointing(lora):
    ref_loss, ref = _loss_and_grads(_model(False, lora=lora), IDS)
    assert len(ref) == (2 * 8 if lora else 2 * 6 + 2)  # A and B on 4 linears a block; or every parameter
    for ac in (True, "selective"):
        model = _model(ac, lora=lora)
        assert sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules()) == 2
        loss, grads = _loss_and_grads(model, IDS)
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        assert grads.keys() == ref.keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-6, atol=1e-7, msg=f"{ac}: {k}")


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is SDPA_CPU
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("ac", "recomputes"), [(True, 2), ("selective", 0), (False, 0)])
def test_selective_backward_runs_no_attention_forward(ac, recomputes):
    model = _model(ac, lora=True)
    with _CountAttention() as forward:
        loss = model(IDS, labels=IDS).loss
    with _CountAttention() as backward:
        loss.backward()
    assert (forward.calls, backward.calls) == (CFG.n_layers, recomputes)


def test_the_policy_names_every_attention_kernel():
    ops = attention_ops()
    assert SDPA_CPU in ops
    assert torch.ops.smalto.cudnn_attention_fwd.default in ops
    assert torch.ops.aten._scaled_dot_product_flash_attention.default in ops
    assert torch.ops.aten._scaled_dot_product_cudnn_attention.default in ops
    assert torch.ops.higher_order.flex_attention in ops


def _backward_graphs(model) -> list:
    """Compile each block with AOT autograd (as inductor partitions it) and keep the backward graphs."""
    graphs: list = []

    def forward(gm, _):
        return make_boxed_func(gm.forward)

    def backward(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward, bw_compiler=backward)
    for block in model.transformer.blocks:
        block.compile(backend=backend)
    return graphs


def test_compiled_selective_block_saves_attention():
    torch._dynamo.reset()
    model = _model("selective", lora=True)
    graphs = _backward_graphs(model)
    _, ref = _loss_and_grads(_model(False, lora=True), IDS)
    _, grads = _loss_and_grads(model, IDS)
    for k in grads:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert graphs  # one backward graph serves both blocks
    for gm in graphs:
        targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default in targets
        assert SDPA_CPU not in targets


def test_selective_compiles_with_inductor():
    """Inductor's fused float32 kernels sum in another order than eager's: equal to float32 rounding."""
    torch._dynamo.reset()
    _, ref = _loss_and_grads(_model(False, lora=True), IDS)
    _, grads = _loss_and_grads(_model("selective", lora=True, compile=True), IDS)
    for k in grads:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
