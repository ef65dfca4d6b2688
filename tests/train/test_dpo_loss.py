"""The DPO loss and its gradients against TRL's published formulas, with literal numbers worked by hand, and against
TRL's own DPOTrainer loss code (trl is in the dev extra)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from smalto.train.dpo import DPOSection, dpo_loss

# two pairs: summed completion log-probs of the policy and the reference
CHOSEN, REJECTED = [-10.0, -7.0], [-12.0, -6.0]
REF_CHOSEN, REF_REJECTED = [-11.0, -7.5], [-11.5, -6.5]
# the log-ratio differences d: (1.0 - (-0.5)) = 1.5 and (0.5 - 0.5) = 0


def _grads(loss_type: str, **kw):
    c = torch.tensor(CHOSEN, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(REJECTED, dtype=torch.float64, requires_grad=True)
    losses, cr, rr = dpo_loss(
        c, r, torch.tensor(REF_CHOSEN, dtype=torch.float64), torch.tensor(REF_REJECTED, dtype=torch.float64),
        loss_type=loss_type, **kw,
    )  # fmt: skip
    losses.mean().backward()
    return losses.tolist(), c.grad.tolist(), r.grad.tolist(), cr.tolist(), rr.tolist()


def test_sigmoid_loss_rewards_and_gradients_by_hand():
    # loss = -log σ(β d): log(1 + e^-0.15) = 0.62095705..., log 2 = 0.69314718...
    # dL/dc = -β σ(-β d) / 2 (mean of 2): -0.1 · 0.46257015 / 2, -0.1 · 0.5 / 2; dL/dr the opposite
    losses, gc, gr, cr, rr = _grads("sigmoid", beta=0.1)
    assert losses == pytest.approx([0.6209570477895321, 0.6931471805599453], abs=1e-12)
    assert gc == pytest.approx([-0.023128507733, -0.025], abs=1e-12)
    assert gr == pytest.approx([0.023128507733, 0.025], abs=1e-12)
    assert cr == pytest.approx([0.1, 0.05]) and rr == pytest.approx([-0.05, 0.05])  # β (log π - log π_ref)


def test_conservative_dpo_label_smoothing_by_hand():
    # cDPO, ε = 0.1: 0.9 · log(1 + e^-0.15) + 0.1 · log(1 + e^0.15) = 0.9 · 0.62095705 + 0.1 · 0.77095705
    # dL/dd = β (-(1-ε) σ(-β d) + ε σ(β d)): pair 1: 0.1 · (-0.9 · 0.46257015 + 0.1 · 0.53742985) = -0.03625702,
    # halved by the mean over 2 pairs
    losses, gc, gr, _, _ = _grads("sigmoid", beta=0.1, label_smoothing=0.1)
    assert losses == pytest.approx([0.6359570477895321, 0.6931471805599453], abs=1e-12)
    assert gc == pytest.approx([-0.0181285077, -0.02], abs=1e-9)
    assert gr == pytest.approx([0.0181285077, 0.02], abs=1e-9)


def test_ipo_loss_uses_average_log_probs_by_hand():
    # completion tokens: chosen 4 and 2, rejected 5 and 3; d' = 1.0/4 + 0.5/5 = 0.35 and 0.5/2 - 0.5/3 = 1/12
    # loss = (d' - 1/(2β))² with β = 0.1: (0.35 - 5)² = 21.6225, (1/12 - 5)² = 24.17361...
    # dL/dc = 2 (d' - 5) / n_c / 2 (mean): -4.65/4 = -1.1625, -4.91667/2 = -2.458333
    losses, gc, gr, _, _ = _grads(
        "ipo", beta=0.1, chosen_lengths=torch.tensor([4, 2]), rejected_lengths=torch.tensor([5, 3])
    )
    assert losses == pytest.approx([21.6225, (1 / 12 - 5) ** 2], abs=1e-12)
    assert gc == pytest.approx([-1.1625, -(5 - 1 / 12) / 2], abs=1e-12)
    assert gr == pytest.approx([4.65 / 5, (5 - 1 / 12) / 3], abs=1e-12)
    assert math.isclose(losses[1], 24.173611111111111, abs_tol=1e-12)


def test_section_rejects_what_trl_rejects():
    from smalto.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dpo.loss_type = 'hinge' is not allowed.*sigmoid, ipo"):
        DPOSection(loss_type="hinge")
    with pytest.raises(ConfigError, match=r"label_smoothing = 0.5 must be in \[0, 0.5\)"):
        DPOSection(label_smoothing=0.5)
    with pytest.raises(ConfigError, match="beta"):
        DPOSection(beta=0.0)


def _trl_loss(per_token: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor, loss_type: str, beta: float):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs (its model output, zero off the completion)
    and precomputed reference log-probs."""
    from trl import DPOTrainer

    outputs = SimpleNamespace(
        log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )  # fmt: skip

    class Model:
        training = True

        def __call__(self, **kw):
            return outputs

    half = ref.shape[0] // 2
    trainer = SimpleNamespace(
        model=Model(), accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    full_mask = torch.cat([torch.zeros(mask.shape[0], 1, dtype=mask.dtype), mask], dim=1)  # unshifted
    inputs = {
        "input_ids": torch.ones_like(full_mask), "attention_mask": torch.ones_like(full_mask),
        "completion_mask": full_mask, "ref_chosen_logps": ref[:half], "ref_rejected_logps": ref[half:],
    }  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, Model(), inputs, False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_gradients_and_metrics_equal_trls(loss_type):
    pytest.importorskip("trl")  # in the dev extra; absent only outside it
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 7, generator=g) > 0.3).to(torch.int64)
    mask[:, 0] = 1  # every completion has a token
    raw = -3 * torch.rand(4, 7, generator=g, dtype=torch.float64)
    ref = -10 * torch.rand(4, generator=g, dtype=torch.float64)

    leaf_trl = raw.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_loss(leaf_trl * mask, mask, ref, loss_type, beta=0.2)
    trl_loss.backward()

    leaf = raw.clone().requires_grad_(True)
    logps, counts = (leaf * mask).sum(1), mask.sum(1)
    losses, cr, rr = dpo_loss(
        logps[:2], logps[2:], ref[:2], ref[2:], beta=0.2, loss_type=loss_type,
        chosen_lengths=counts[:2], rejected_lengths=counts[2:],
    )  # fmt: skip
    losses.mean().backward()
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-12)
    torch.testing.assert_close(leaf.grad, leaf_trl.grad, rtol=1e-12, atol=1e-15)
    assert cr.mean().item() == pytest.approx(trl_metrics["rewards/chosen"][0], rel=1e-12)
    assert rr.mean().item() == pytest.approx(trl_metrics["rewards/rejected"][0], rel=1e-12)
    assert (cr > rr).double().mean().item() == trl_metrics["rewards/accuracies"][0]
    assert (cr - rr).mean().item() == pytest.approx(trl_metrics["rewards/margins"][0], rel=1e-12)
