"""Reward-model and PRM losses against written-out scalar computations."""

import math

import pytest
import torch

from posttrain.losses.prm import aggregate_step_scores, last_step_mask, prm_loss, step_logits
from posttrain.losses.reward import bradley_terry_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


RC = [1.5, -0.2, 0.3, 2.0]
RR = [0.5, 0.4, 0.3, -1.0]


def test_bradley_terry_plain():
    loss, m = bradley_terry_loss(torch.tensor(RC), torch.tensor(RR))
    expected = sum(-_log_sigmoid(c - r) for c, r in zip(RC, RR)) / len(RC)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # wins: 1.5>0.5 yes, -0.2>0.4 no, 0.3==0.3 tie (1/2), 2.0>-1.0 yes
    assert m["accuracy"].item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["margin"].item() == pytest.approx(sum(c - r for c, r in zip(RC, RR)) / 4, rel=1e-6)
    assert m["chosen_rewards"].item() == pytest.approx(sum(RC) / 4, rel=1e-6)
    assert m["rejected_rewards"].item() == pytest.approx(sum(RR) / 4, rel=1e-6)
    assert "centering_loss" not in m


def test_bradley_terry_margin_and_centering():
    margins = [1.0, 0.0, 2.0, 0.5]
    coef = 0.01
    loss, m = bradley_terry_loss(
        torch.tensor(RC), torch.tensor(RR), margin=torch.tensor(margins), center_rewards_coefficient=coef
    )
    bt = sum(-_log_sigmoid(c - r - mg) for c, r, mg in zip(RC, RR, margins)) / 4
    center = sum((c + r) ** 2 for c, r in zip(RC, RR)) / 4
    assert loss.item() == pytest.approx(bt + coef * center, rel=1e-6)
    assert m["centering_loss"].item() == pytest.approx(center, rel=1e-6)
    # the margin column changes the loss, not the accuracy metric
    assert m["accuracy"].item() == pytest.approx(0.625)


def test_bradley_terry_gradient():
    rc = torch.tensor(RC, requires_grad=True)
    rr = torch.tensor(RR, requires_grad=True)
    loss, _ = bradley_terry_loss(rc, rr, center_rewards_coefficient=0.1)
    loss.backward()
    for i, (c, r) in enumerate(zip(RC, RR)):
        # d/dc [-log sig(c - r)] = -(1 - sig(c - r)); d/dc [coef (c + r)^2] = 2 coef (c + r); each / B
        sig = 1 / (1 + math.exp(-(c - r)))
        assert rc.grad[i].item() == pytest.approx((-(1 - sig) + 0.2 * (c + r)) / 4, rel=1e-5)
        assert rr.grad[i].item() == pytest.approx(((1 - sig) + 0.2 * (c + r)) / 4, rel=1e-5)


def test_bradley_terry_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))


# two rows, length 6, 2-label logits; labels only at separator positions
LOGITS = torch.tensor(
    [
        [[0.0, 0.0], [0.2, 1.0], [9.0, 9.0], [1.0, -0.5], [0.0, 0.0], [0.3, 0.1]],
        [[0.0, 0.0], [0.0, 0.0], [-1.0, 2.0], [0.0, 0.0], [0.5, 0.5], [0.0, 0.0]],
    ]
)
LABELS = torch.tensor([[-100, 1, -100, 0, -100, 1], [-100, -100, 0, -100, -100, -100]])


def _bce(z: float, y: int) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_prm_loss_all_steps():
    loss, m = prm_loss(LOGITS, LABELS)
    steps = [(1.0 - 0.2, 1), (-0.5 - 1.0, 0), (0.1 - 0.3, 1), (2.0 - (-1.0), 0)]
    expected = sum(_bce(z, y) for z, y in steps) / len(steps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # predictions (z > 0): 1, 0, 0, 1 vs labels 1, 0, 1, 0 -> 2/4 right
    assert m["step_accuracy"].item() == pytest.approx(0.5)
    assert m["positive_accuracy"].item() == pytest.approx(0.5)  # labels 1: right, wrong
    assert m["negative_accuracy"].item() == pytest.approx(0.5)  # labels 0: right, wrong
    assert m["positive_fraction"].item() == pytest.approx(0.5)
    assert m["num_steps"].item() == 4


def test_prm_loss_equals_two_class_cross_entropy():
    loss, _ = prm_loss(LOGITS, LABELS)
    ce = torch.nn.functional.cross_entropy(LOGITS.reshape(-1, 2), LABELS.reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_prm_loss_last_step_only():
    loss, m = prm_loss(LOGITS, LABELS, train_on_last_step_only=True)
    steps = [(0.1 - 0.3, 1), (2.0 - (-1.0), 0)]  # last labelled position of each row
    assert loss.item() == pytest.approx(sum(_bce(z, y) for z, y in steps) / 2, rel=1e-6)
    assert m["num_steps"].item() == 2
    assert m["step_accuracy"].item() == pytest.approx(0.0)
    mask = last_step_mask(LABELS)
    assert mask.nonzero().tolist() == [[0, 5], [1, 2]]


def test_prm_loss_single_logit_and_empty_class():
    z = torch.tensor([[0.0, 2.0, 0.0, -3.0]], requires_grad=True)
    labels = torch.tensor([[-100, 1, -100, 1]])
    loss, m = prm_loss(z, labels)
    assert loss.item() == pytest.approx((_bce(2.0, 1) + _bce(-3.0, 1)) / 2, rel=1e-6)
    assert math.isnan(m["negative_accuracy"].item())
    assert m["positive_accuracy"].item() == pytest.approx(0.5)
    loss.backward()
    assert z.grad[0, 0].item() == 0.0 and z.grad[0, 1].item() < 0.0
    assert torch.equal(step_logits(z.detach()[..., None]), z.detach())


def test_prm_loss_no_labels_keeps_graph():
    z = torch.zeros(1, 3, 2, requires_grad=True)
    loss, m = prm_loss(z, torch.full((1, 3), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    assert m["num_steps"].item() == 0


@pytest.mark.parametrize(
    "method,expected",
    [("min", 0.2), ("product", 0.9 * 0.2 * 0.5), ("last", 0.5), ("mean", (0.9 + 0.2 + 0.5) / 3)],
)
def test_aggregate_step_scores(method, expected):
    assert aggregate_step_scores([0.9, 0.2, 0.5], method) == pytest.approx(expected)
    assert aggregate_step_scores(torch.tensor([0.9, 0.2, 0.5]), method) == pytest.approx(expected)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="empty"):
        aggregate_step_scores([], "min")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_step_scores([0.5], "median")
