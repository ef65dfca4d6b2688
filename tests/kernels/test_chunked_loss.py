"""The chunked head loss equals the full-logits loss, value and gradients, and never needs the full logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smalto.kernels.chunked_loss import chunked_head_loss
from smalto.model.mpt import head_loss


def _inputs(dtype: torch.dtype, vocab: int = 37, d: int = 16, ignored: float = 0.3):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 11), generator=g)
    labels[torch.rand(3, 11, generator=g) < ignored] = -100
    return h, w, labels


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_value_and_gradients_equal_the_full_loss_in_float64(scale: float | None, chunk_tokens: int) -> None:
    h, w, labels = _inputs(torch.float64)
    ref = head_loss(h, w, labels, scale)
    gh, gw = torch.autograd.grad(ref * 2.5, (h, w))
    got = chunked_head_loss(h, w, labels, scale, chunk_bytes=chunk_tokens * 4 * w.shape[0])
    ch, cw = torch.autograd.grad(got * 2.5, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ch, gh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cw, gw, rtol=1e-12, atol=1e-12)


def test_ignored_positions_get_no_gradient_and_the_last_position_has_no_target() -> None:
    h, w, labels = _inputs(torch.float64)
    (gh,) = torch.autograd.grad(chunked_head_loss(h, w, labels, chunk_bytes=64), (h,))
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert (gh[targets == -100] == 0).all()
    assert (gh[targets != -100].abs().sum(-1) > 0).all()


def test_bf16_is_as_close_to_float64_as_the_full_bf16_loss() -> None:
    h64, w64, labels = _inputs(torch.float64, vocab=301, d=32)
    exact = head_loss(h64, w64, labels)
    h, w = h64.detach().bfloat16().requires_grad_(), w64.detach().float().requires_grad_()
    full = head_loss(h, w.bfloat16(), labels)
    chunked = chunked_head_loss(h, w, labels, chunk_bytes=8 * 4 * 301)
    assert abs(chunked.item() - exact.item()) <= 2 * abs(full.item() - exact.item()) + 1e-3
    (gw,) = torch.autograd.grad(chunked, (w,))
    (gw_exact,) = torch.autograd.grad(exact, (w64,))
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw.double(), gw_exact, rtol=0.05, atol=2e-3)


def test_no_grad_and_no_targets() -> None:
    h, w, labels = _inputs(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(chunked_head_loss(h, w, labels), head_loss(h, w, labels))
    none = torch.full_like(labels, -100)
    loss = chunked_head_loss(h, w, none)
    assert loss.item() == 0.0
    (gh,) = torch.autograd.grad(loss, (h,))
    assert (gh == 0).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def test_no_operator_produces_more_than_one_chunk_of_logits() -> None:
    vocab, d = 4096, 8
    h = torch.randn(1, 2049, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (1, 2049))
    full_logits = 2048 * vocab * 4
    with _LargestTensor() as plain:
        head_loss(h, w, labels).backward()
    with _LargestTensor() as chunked:
        loss = chunked_head_loss(h, w, labels, chunk_bytes=1 << 20)
        loss.backward()
    assert plain.bytes >= full_logits
    assert chunked.bytes <= 1 << 20
    torch.testing.assert_close(loss, head_loss(h, w, labels))


@pytest.mark.parametrize("ac", [False, True])
def test_a_model_trained_through_the_chunked_loss_gets_the_full_losses_gradients(ac: bool) -> None:
    """Applied from outside (`build_model(head_loss=...)`), inside the model's forward: the tied embedding's
    gradient gathers both its uses, as with the full logits."""
    from smalto.train.parallel import build_model, init_world
    from tests.train.conftest import TINY_MODEL

    world = init_world("cpu")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    grads = []
    for fn in (head_loss, chunked_head_loss):
        model = build_model(TINY_MODEL, world, seed=3, head_loss=fn, activation_checkpointing=ac)
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(l0, model(ids, labels=labels).loss.detach(), rtol=1e-6, atol=1e-6)


def test_auto_keeps_the_full_logits_while_they_are_small() -> None:
    from smalto.kernels.loss import full_head_loss, head_loss_for

    assert head_loss_for("auto", 16 * 2048, 50432) is full_head_loss  # 6.6 GB
    assert head_loss_for("auto", 65536, 50432) is chunked_head_loss  # 13.2 GB
    assert head_loss_for("chunked", 8, 50432) is chunked_head_loss
    assert head_loss_for("full", 65536, 50432) is full_head_loss
