"""The shared policy-gradient primitives (losses/policy_gradient.py) against written-out computations:
plain Python loops over the tokens, one formula per line, no tensor op of the implementation reused."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.losses.grpo import grpo_loss
from posttrain.losses.policy_gradient import (LOSS_TYPES, aggregate_token_loss, clip_metrics, clipped_objective,
                                              importance_metrics, k3_kl, masked_mean, truncated_importance_weights)


def _rows(seed=0, B=3, L=6):
    rnd = random.Random(seed)
    values = [[rnd.uniform(-2, 2) for _ in range(L)] for _ in range(B)]
    mask = [[0] * L for _ in range(B)]
    for i in range(B):
        start = rnd.randint(0, 2)
        for t in range(start, rnd.randint(start + 1, L)):
            mask[i][t] = 1
    return values, mask


def test_masked_mean():
    values, mask = _rows(1)
    picked = [v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m]
    got = masked_mean(torch.tensor(values, dtype=torch.float64), torch.tensor(mask))
    assert got.item() == pytest.approx(sum(picked) / len(picked), rel=1e-12)
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0  # empty mask: 0, not NaN
    assert masked_mean(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, False, True])).item() == 3.5


def test_clipped_objective_elementwise():
    ratios = [0.5, 0.79, 0.95, 1.0, 1.15, 1.25, 1.4, 3.0]
    for adv in (1.5, -0.7, 0.0):
        for eps, eps_high, delta in [(0.2, None, None), (0.2, 0.28, None), (0.2, None, 1.3), (0.1, 0.3, 2.0)]:
            got = clipped_objective(torch.tensor(ratios, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                                    eps, eps_high, delta)
            hi = eps if eps_high is None else eps_high
            for r, g in zip(ratios, got.tolist()):
                unclipped = (min(r, delta) if delta is not None else r) * adv
                clipped = min(max(r, 1 - eps), 1 + hi) * adv
                assert g == pytest.approx(min(unclipped, clipped), abs=1e-15), (r, adv, eps, eps_high, delta)


def test_clipped_objective_broadcasts_sequence_advantages_over_tokens():
    ratio = torch.tensor([[1.0, 1.5], [0.5, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)  # [B, 1]: one advantage per completion
    got = clipped_objective(ratio, adv, 0.2)
    assert got.shape == (2, 2) and got.flatten().tolist() == pytest.approx([2.0, 2.4, -0.8, -1.0], abs=1e-15)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_token_loss_normalisers(loss_type):
    values, mask = _rows(2)
    mask[1] = [0] * len(mask[1])  # an empty completion counts as a sequence with no tokens
    per_seq_sum = [sum(v for v, m in zip(vr, mr) if m) for vr, mr in zip(values, mask)]
    per_seq_n = [sum(mr) for mr in mask]
    n_tok, B, max_len, n_items = sum(per_seq_n), len(values), 9, 17
    expected = {
        "grpo": sum(s / max(n, 1) for s, n in zip(per_seq_sum, per_seq_n)) / B,
        "gspo": sum(s / max(n, 1) for s, n in zip(per_seq_sum, per_seq_n)) / B,
        "bnpo": sum(per_seq_sum) / n_tok,
        "dr_grpo": sum(per_seq_sum) / (B * max_len),
        "dapo": sum(per_seq_sum) / n_items,
        "sequence_sum": sum(per_seq_sum) / B,
    }[loss_type]
    got = aggregate_token_loss(torch.tensor(values, dtype=torch.float64), torch.tensor(mask), loss_type,
                               max_completion_length=max_len, num_items_in_batch=n_items)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_aggregate_token_loss_dapo_defaults_to_local_tokens_and_errors():
    values, mask = _rows(3)
    n_tok = sum(map(sum, mask))
    total = sum(v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m)
    per_token = torch.tensor(values, dtype=torch.float64)
    assert aggregate_token_loss(per_token, torch.tensor(mask), "dapo").item() == pytest.approx(total / n_tok)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_token_loss(per_token, torch.tensor(mask), "dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate_token_loss(per_token, torch.tensor(mask), "ppo")


def test_clip_and_importance_metrics():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 1.1, 0.7]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token (clipped low but A > 0) is not a completion token
    m = clip_metrics(ratio, adv, mask, 0.2, None)
    # high: r > 1.2 with A > 0 (token 0); low: r < 0.8 with A < 0 (token 1); of 4 completion tokens
    assert m["clip_ratio/high_mean"].item() == 0.25 and m["clip_ratio/low_mean"].item() == 0.25
    assert m["clip_ratio/region_mean"].item() == 0.5
    assert clip_metrics(ratio, adv, mask, 0.2, 0.6)["clip_ratio/high_mean"].item() == 0.0  # clip-higher: 1.5 < 1.6
    w = torch.tensor([[0.5, 2.0, 1.0, 3.0]])
    im = importance_metrics(w, torch.tensor([[1, 1, 0, 1]]))
    assert im["sampling/importance_sampling_ratio/mean"].item() == pytest.approx((0.5 + 2.0 + 3.0) / 3)
    assert im["sampling/importance_sampling_ratio/min"].item() == 0.5 and im["sampling/importance_sampling_ratio/max"].item() == 3.0
    empty = importance_metrics(w, torch.zeros(1, 4))
    assert empty["sampling/importance_sampling_ratio/min"].item() == 1.0 and empty["sampling/importance_sampling_ratio/max"].item() == 1.0


def test_k3_kl_and_metric():
    """Moved from test_losses_grpo.py with the primitives (assertions unchanged)."""
    lp = torch.tensor([[-1.0, -2.0, -0.1]])
    ref = torch.tensor([[-1.0, -1.0, -3.0]])
    kl = k3_kl(lp, ref)
    for t in range(3):
        d = ref[0, t].item() - lp[0, t].item()
        assert kl[0, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-6)
    assert kl[0, 0].item() == 0.0 and (kl >= 0).all()
    mask = torch.tensor([[0, 1, 1]])
    _, m = grpo_loss(lp, torch.zeros(1), mask, ref_logps=ref, beta=0.1)
    assert m["kl"].item() == pytest.approx((kl[0, 1] + kl[0, 2]).item() / 2, rel=1e-6)
    _, m0 = grpo_loss(lp, torch.zeros(1), mask, ref_logps=ref, beta=0.0)
    assert "kl" not in m0


def test_truncated_importance_weights_and_metrics():
    """Moved from test_losses_grpo.py with the primitives (assertions unchanged)."""
    old = torch.tensor([[0.0, -1.0, -1.0, -0.2]])
    sampler = torch.tensor([[0.0, -1.5, -0.5, -3.0]])
    w = truncated_importance_weights(old, sampler, cap=2.0)
    expected = [min(math.exp(o - s), 2.0) for o, s in zip(old[0].tolist(), sampler[0].tolist())]
    assert w[0].tolist() == pytest.approx(expected)
    mask = torch.tensor([[0, 1, 1, 1]])
    _, m = grpo_loss(old.clone(), torch.ones(1), mask, old_logps=old, sampler_logps=sampler, is_cap=2.0)
    assert m["sampling/importance_sampling_ratio/max"].item() == pytest.approx(2.0)
    assert m["sampling/importance_sampling_ratio/min"].item() == pytest.approx(math.exp(-0.5))
    assert m["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(sum(expected[1:]) / 3)


