"""Online DPO, XPO and Nash-MD losses against written-out computations."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.online_preference import nash_md_loss, online_dpo_loss, xpo_loss


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_online_dpo_sigmoid_and_ipo_match_formulas():
    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.2
    h = [((-3.0) - (-3.5)) - ((-4.0) - (-3.0)), ((-5.0) - (-4.0)) - ((-2.0) - (-3.0))]
    loss, metrics = online_dpo_loss(c, r, rc, rr, beta=beta, loss_type="sigmoid")
    assert loss.tolist() == pytest.approx([-_logsig(beta * x) for x in h])
    assert metrics["rewards/chosen"].item() == pytest.approx(beta * (0.5 + -1.0) / 2)
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.5)
    ipo, _ = online_dpo_loss(c, r, rc, rr, beta=beta, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in h])  # summed, not length-averaged
    with pytest.raises(ValueError, match="hinge"):
        online_dpo_loss(c, r, rc, rr, beta=beta, loss_type="hinge")


def test_xpo_adds_alpha_times_policy_logp_of_reference_sample():
    c, r, rc, rr = (torch.tensor([v]) for v in (-2.0, -3.0, -2.5, -2.5))
    ref_sample = torch.tensor([-7.0], requires_grad=True)
    loss, metrics = xpo_loss(c, r, rc, rr, ref_sample, beta=0.5, alpha=0.01)
    h = (-2.0 + 2.5) - (-3.0 + 2.5)
    assert loss.item() == pytest.approx(-_logsig(0.5 * h) + 0.01 * -7.0)
    assert metrics["loss/xpo"].item() == pytest.approx(-0.07)
    assert metrics["loss/dpo"].item() == pytest.approx(-_logsig(0.5 * h))
    loss.sum().backward()
    assert ref_sample.grad.item() == pytest.approx(0.01)  # minimizing lowers the reference sample's likelihood


def test_nash_md_loss_value_and_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -0.9, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    prob = torch.tensor([0.9, 0.2])
    beta = 0.3
    loss, metrics = nash_md_loss(logps, ref, mask, prob, beta=beta)
    expected, kls = [], []
    for i in range(2):
        n = int(mask[i].sum())
        lp, rf = logps[i, :n].tolist(), ref[i, :n].tolist()
        d = [a - b for a, b in zip(lp, rf)]
        kls.append(sum(d))
        expected.append(beta * sum(x * y for x, y in zip(d, lp)) - (prob[i].item() - 0.5) * sum(lp))
    assert loss.tolist() == pytest.approx(expected)
    assert metrics["loss/kl"].item() == pytest.approx(sum(kls) / 2)
    assert metrics["rewards/win_rate"].item() == pytest.approx(0.5)
    loss.sum().backward()
    # d loss / d logp_t = beta * d_t - (P - 1/2) on the masked tokens (d_t held constant), 0 on padding
    grad = [[beta * (logps[i, t].item() - ref[i, t].item()) - (prob[i].item() - 0.5) if mask[i, t] else 0.0
             for t in range(3)] for i in range(2)]
    assert logps.grad.tolist() == [pytest.approx(g) for g in grad]
