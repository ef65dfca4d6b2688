"""The base-2 cross-entropy CUDA compiles (smalto/model/loss.py) against F.cross_entropy: loss and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from smalto.model.loss import causal_lm_loss, cross_entropy_base2


def _pair(logits, targets):
    out = []
    for fn in (
        lambda x, t: F.cross_entropy(x.float(), t, ignore_index=-100),
        lambda x, t: cross_entropy_base2(x, t, -100),
    ):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1000.0])  # large logits: the row maximum keeps exp2 finite
def test_base2_cross_entropy_equals_f_cross_entropy(dtype, offset):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 503, generator=gen) * 4 + offset).to(dtype)
    targets = torch.randint(0, 503, (64,), generator=gen)
    targets[::5] = -100  # ignored positions count in neither sum nor mean
    (ref, gref), (got, g) = _pair(logits, targets)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(g.float(), gref.float(), rtol=0, atol=2e-7 if dtype == torch.float32 else 1e-6)
    assert torch.all(g[::5] == 0)


def test_base2_cross_entropy_compiled_and_all_ignored():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 97, generator=gen)
    targets = torch.randint(0, 97, (16,), generator=gen)
    compiled = torch.compile(cross_entropy_base2, dynamic=False)
    torch.testing.assert_close(
        compiled(logits, targets, -100), F.cross_entropy(logits, targets), rtol=2e-6, atol=0
    )
    none = torch.full((16,), -100)
    assert math.isnan(float(cross_entropy_base2(logits, none, -100)))
    assert math.isnan(float(F.cross_entropy(logits, none, ignore_index=-100)))


def test_causal_lm_loss_shifts_labels():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(logits, labels), ref, rtol=1e-6, atol=0)
