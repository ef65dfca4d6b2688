"""The model as the trainer builds it: meta → (activation checkpointing) → materialised, world size 1."""

from __future__ import annotations

import torch

from smalto.train.parallel import build_model, init_world
from tests.train.conftest import TINY_MODEL as CFG


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
    }


def test_materialised_weights_depend_on_the_seed_only():
    world = init_world("cpu")
    a, b, c = (build_model(CFG, world, seed=s) for s in (1, 1, 2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["transformer.blocks.0.attn.Wqkv.weight"], sc["transformer.blocks.0.attn.Wqkv.weight"]
    )
    assert not any(t.is_meta for t in sa.values())
    # init as the model's own scheme: norms at 1, residual projections scaled down by sqrt(2·n_layers)
    assert torch.equal(sa["transformer.norm_f.weight"], torch.ones(64))
    ratio = (
        sa["transformer.blocks.0.attn.out_proj.weight"].std()
        / sa["transformer.blocks.0.attn.Wqkv.weight"][:64].std()
    )
    assert abs(float(ratio) - 1 / 6**0.5) < 0.05


def test_activation_checkpointing_changes_nothing_but_memory():
    world = init_world("cpu")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = _loss_and_grads(build_model(CFG, world, seed=5), ids)
    for ac in (True, 2):
        model = build_model(CFG, world, seed=5, activation_checkpointing=ac)
        wrapped = sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules())
        assert wrapped == (3 if ac is True else 2)
        loss, grads = _loss_and_grads(model, ids)
        torch.testing.assert_close(loss, ref[0], rtol=0, atol=0)
        assert grads.keys() == ref[1].keys()
        for k in grads:
            torch.testing.assert_close(grads[k], ref[1][k], rtol=1e-6, atol=1e-7)
