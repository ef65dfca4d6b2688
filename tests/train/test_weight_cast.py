"""`train.weight_cast: step`: bf16 weights made once per step give the gradients autocast's per-forward casts give,
bit for bit, with float32 `.grad` accumulated over micro-batches (smalto/train/weight_cast.py)."""

from __future__ import annotations

import pytest
import torch

from smalto.train.parallel import build_model, init_world
from smalto.train.weight_cast import StepCastLinear, StepWeightCast
from tests.train.conftest import TINY_MODEL as CFG


def _grads(model, micro_batches, cast: StepWeightCast | None):
    model.zero_grad(set_to_none=True)
    with cast if cast is not None else torch.enable_grad():
        for ids in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("compile", "ac"), [(False, False), (True, False), (True, True)])
def test_step_cast_gradients_equal_autocast_casts_bit_for_bit(compile, ac):
    world = init_world("cpu")
    gen = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(3)]
    model = build_model(CFG, world, seed=3, step_cast=True, compile=compile, activation_checkpointing=ac)
    ref = _grads(model, micro_batches, None)
    cast = StepWeightCast(model, torch.bfloat16)
    assert len(cast.linears) == 4 * CFG.n_layers  # Wqkv, out_proj, up_proj, down_proj
    for _ in range(2):  # a second step: fresh copies, .grad starts again from none
        got = _grads(model, micro_batches, cast)
        assert got.keys() == ref.keys()
        for name, g in got.items():
            assert g.dtype == torch.float32, name
            assert torch.equal(g, ref[name]), name
    # the copies live for the step only, and their own gradients were handed over
    assert all(m.weight_lp is None for m in model.modules() if isinstance(m, StepCastLinear))


def test_step_cast_copies_are_bf16_leaves_used_by_the_forward():
    world = init_world("cpu")
    model = build_model(CFG, world, seed=3, step_cast=True)
    cast = StepWeightCast(model, torch.bfloat16)
    ids = torch.randint(0, 256, (1, 8))
    with cast:
        lin = cast.linears[0]
        assert lin.weight_lp is not None and lin.weight_lp.dtype == torch.bfloat16
        assert lin.weight_lp.is_leaf and lin.weight_lp.requires_grad
        torch.testing.assert_close(lin.weight_lp, lin.weight.to(torch.bfloat16), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert lin.weight_lp.grad is None  # moved into the float32 parameter's .grad by the hook
        assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
        # the forward reads the step's copy: the float32 weight changed inside the step changes nothing
        with torch.no_grad():
            lin.weight.zero_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(ids, labels=ids).loss, loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # after the step, the weight itself again
        assert not torch.equal(model(ids, labels=ids).loss, loss)


def test_step_cast_keeps_names_and_state_dict():
    """The cast is applied from outside: the same parameters under the same names; the model's own linears are
    plain nn.Linear until training swaps them."""
    world = init_world("cpu")
    plain, cast = build_model(CFG, world, seed=3), build_model(CFG, world, seed=3, step_cast=True)
    assert not any(isinstance(m, StepCastLinear) for m in plain.modules())
    assert sum(isinstance(m, StepCastLinear) for m in cast.modules()) == 4 * CFG.n_layers
    a, b = plain.state_dict(), cast.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="use_step_cast"):
        StepWeightCast(plain, torch.bfloat16)
