"""GRPO/RLOO losses and advantages against independent written-out computations (plain Python loops)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.losses.advantages import group_relative_advantages, normalize_advantages, rloo_advantages
from posttrain.losses.grpo import grpo_loss
from posttrain.losses.rloo import rloo_loss, sequence_kl

# ----------------------------------------------------------------------------- reference (plain Python)


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # unbiased
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_policy_loss(
    lp, adv, mask, *, old, ref=None, sampler=None, loss_type="grpo", beta=0.0, eps=0.2,
    eps_high=None, delta=None, cap=2.0, max_len=None, n_items=None,
):
    """lp, old, ref, sampler, mask: lists of lists; adv: list. Returns a float."""
    eh = eps if eps_high is None else eps_high
    rows = []  # per sequence: list of per-token losses
    for i in range(len(lp)):
        toks = [t for t in range(len(lp[i])) if mask[i][t]]
        if loss_type == "gspo" and toks:
            s = math.exp(_mean([lp[i][t] - old[i][t] for t in toks]))
            w_seq = min(math.exp(_mean([old[i][t] - sampler[i][t] for t in toks])), cap) if sampler else 1.0
        row = []
        for t in toks:
            r = s if loss_type == "gspo" else math.exp(lp[i][t] - old[i][t])
            unclipped = min(r, delta) if delta is not None else r
            clipped = min(max(r, 1 - eps), 1 + eh)
            obj = min(unclipped * adv[i], clipped * adv[i])
            if sampler is None:
                w = 1.0
            elif loss_type == "gspo":
                w = w_seq
            else:
                w = min(math.exp(old[i][t] - sampler[i][t]), cap)
            loss = -w * obj
            if beta and ref is not None:
                d = ref[i][t] - lp[i][t]
                loss += beta * (math.exp(d) - d - 1)
            row.append(loss)
        rows.append(row)
    total = sum(sum(r) for r in rows)
    n_tok = sum(len(r) for r in rows)
    if loss_type in ("grpo", "gspo"):
        return _mean([sum(r) / max(len(r), 1) for r in rows])
    if loss_type == "bnpo":
        return total / max(n_tok, 1)
    if loss_type == "dr_grpo":
        return total / (len(rows) * max_len)
    if loss_type == "dapo":
        return total / (n_items if n_items is not None else n_tok)
    if loss_type == "sequence_sum":
        return _mean([sum(r) for r in rows])
    raise AssertionError(loss_type)


def _batch(seed=0, B=4, L=7, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, L, generator=g, dtype=torch.float64) * spread
    ref = lp + torch.randn(B, L, generator=g, dtype=torch.float64) * spread
    sampler = old + torch.randn(B, L, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.long)
    rnd = random.Random(seed)
    for i in range(B):
        start = rnd.randint(1, 3)
        end = rnd.randint(start + 1, L)
        mask[i, start:end] = 1
    return lp, old, ref, sampler, adv, mask


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", beta=0.1, eps_high=0.28),
    dict(loss_type="bnpo", beta=0.05, sampler=True),
    dict(loss_type="dr_grpo", max_len=9, delta=1.3),
    dict(loss_type="dapo", n_items=40, sampler=True, beta=0.04),
    dict(loss_type="dapo"),
    dict(loss_type="gspo", eps=0.05, eps_high=0.08),
    dict(loss_type="gspo", sampler=True, beta=0.1),
]


def _call(lp, old, ref, sampler, adv, mask, case):
    return grpo_loss(
        lp, adv, mask, old_logps=old, ref_logps=ref,
        sampler_logps=sampler if case.get("sampler") else None,
        loss_type=case["loss_type"], beta=case.get("beta", 0.0), epsilon=case.get("eps", 0.2),
        epsilon_high=case.get("eps_high"), delta=case.get("delta"), is_cap=1.5,
        max_completion_length=case.get("max_len"), num_items_in_batch=case.get("n_items"),
    )


def _ref(lp, old, ref, sampler, adv, mask, case):
    return ref_policy_loss(
        lp.tolist(), adv.tolist(), mask.tolist(), old=old.tolist(), ref=ref.tolist(),
        sampler=sampler.tolist() if case.get("sampler") else None, loss_type=case["loss_type"],
        beta=case.get("beta", 0.0), eps=case.get("eps", 0.2), eps_high=case.get("eps_high"),
        delta=case.get("delta"), cap=1.5, max_len=case.get("max_len"), n_items=case.get("n_items"),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_loss_value_matches_reference(case):
    for seed in range(3):
        lp, old, ref, sampler, adv, mask = _batch(seed)
        loss, _ = _call(lp, old, ref, sampler, adv, mask, case)
        assert loss.item() == pytest.approx(_ref(lp, old, ref, sampler, adv, mask, case), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_loss_gradient_matches_finite_differences(case):
    lp, old, ref, sampler, adv, mask = _batch(7)
    x = lp.clone().requires_grad_(True)
    loss, _ = _call(x, old, ref, sampler, adv, mask, case)
    (grad,) = torch.autograd.grad(loss, x)
    h = 1e-6
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            up, down = lp.clone(), lp.clone()
            up[i, t] += h
            down[i, t] -= h
            num = (_ref(up, old, ref, sampler, adv, mask, case) - _ref(down, old, ref, sampler, adv, mask, case)) / (2 * h)
            assert grad[i, t].item() == pytest.approx(num, abs=1e-6), (i, t)


def _one_token_each(ratios, advs, **kw):
    """One completion token per row at position 1, with the given ratios exp(logp - old)."""
    B = len(ratios)
    lp = torch.full((B, 3), -1.0, dtype=torch.float64)
    old = lp.clone()
    old[:, 1] = lp[:, 1] - torch.log(torch.tensor(ratios, dtype=torch.float64))
    mask = torch.zeros(B, 3, dtype=torch.long)
    mask[:, 1] = 1
    x = lp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, torch.tensor(advs, dtype=torch.float64), mask, old_logps=old, loss_type="bnpo", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad[:, 1]


def test_clipping_both_sides_and_metrics():
    # rows: high-clipped (r>1+eps, A>0), low-clipped (r<1-eps, A<0), r>1+eps with A<0 (not clipped), inside
    loss, metrics, grad = _one_token_each([1.5, 0.5, 1.5, 1.1], [1.0, -1.0, -1.0, 1.0], epsilon=0.2)
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0
    assert grad[2].item() == pytest.approx(-(-1.0) * 1.5 / 4)  # d(-r*A)/dlogp = -r*A, bnpo mean over 4
    assert grad[3].item() == pytest.approx(-1.1 / 4)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(-(1.2 * 1 + 0.8 * -1 + 1.5 * -1 + 1.1 * 1) / 4)


def test_clip_higher_widens_only_the_upper_bound():
    _, m, grad = _one_token_each([1.25, 0.75], [1.0, -1.0], epsilon=0.2, epsilon_high=0.28)
    assert grad[0].item() != 0.0  # 1.25 < 1.28: still learning
    assert grad[1].item() == 0.0  # 0.75 < 0.8: lower bound unchanged
    assert m["clip_ratio/high_mean"].item() == 0.0 and m["clip_ratio/low_mean"].item() == 0.5


def test_two_sided_delta_caps_negative_advantage_ratio():
    loss_nodelta, _, g0 = _one_token_each([3.0], [-1.0], epsilon=0.2)
    loss_delta, _, g1 = _one_token_each([3.0], [-1.0], epsilon=0.2, delta=1.5)
    assert loss_nodelta.item() == pytest.approx(3.0) and g0[0].item() == pytest.approx(3.0)
    assert loss_delta.item() == pytest.approx(1.5) and g1[0].item() == 0.0
    # below delta, delta changes nothing
    loss_small, _, _ = _one_token_each([1.4], [-1.0], epsilon=0.2, delta=1.5)
    assert loss_small.item() == pytest.approx(1.4)


def test_gspo_uses_sequence_geometric_mean_ratio():
    lp = torch.tensor([[0.0, -1.0, -2.0, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1]])
    # token log-ratios 0.3, -0.1, 0.1 -> mean 0.1: s = e^0.1 ~ 1.105 (inside eps=0.2)
    old = lp - torch.tensor([[0.0, 0.3, -0.1, 0.1]], dtype=torch.float64)
    adv = torch.tensor([2.0], dtype=torch.float64)
    loss, m = grpo_loss(lp, adv, mask, old_logps=old, loss_type="gspo", epsilon=0.2)
    assert loss.item() == pytest.approx(-math.exp(0.1) * 2.0)
    # same mean log-ratio spread differently over tokens: same GSPO loss, different token-level loss
    old2 = lp - torch.tensor([[0.0, 0.1, 0.1, 0.1]], dtype=torch.float64)
    assert grpo_loss(lp, adv, mask, old_logps=old2, loss_type="gspo")[0].item() == pytest.approx(loss.item())
    assert grpo_loss(lp, adv, mask, old_logps=old, loss_type="grpo")[0].item() != pytest.approx(loss.item())
    # a sequence ratio beyond the clip is clipped once for the whole sequence
    old3 = lp - 0.5 * mask
    loss3, m3 = grpo_loss(lp, adv, mask, old_logps=old3, loss_type="gspo", epsilon=0.2)
    assert loss3.item() == pytest.approx(-1.2 * 2.0)
    assert m3["clip_ratio/high_mean"].item() == 1.0


def test_first_iteration_is_plain_policy_gradient():
    lp, _, _, _, adv, mask = _batch(3)
    x = lp.clone().requires_grad_(True)
    loss, m = grpo_loss(x, adv, mask, loss_type="grpo")
    (grad,) = torch.autograd.grad(loss, x)
    B = lp.shape[0]
    for i in range(B):
        n = int(mask[i].sum())
        for t in range(lp.shape[1]):
            expected = -adv[i].item() / (n * B) if mask[i, t] else 0.0
            assert grad[i, t].item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert m["clip_ratio/region_mean"].item() == 0.0


def test_empty_completion_rows_do_not_produce_nan():
    lp, old, ref, sampler, adv, mask = _batch(1)
    mask[0] = 0
    for lt in ("grpo", "bnpo", "dapo", "gspo"):
        loss, m = grpo_loss(lp, adv, mask, old_logps=old, loss_type=lt, sampler_logps=sampler)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())


def test_bad_loss_type_and_dr_grpo_without_length():
    lp, old, _, _, adv, mask = _batch(0)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(lp, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, adv, mask, loss_type="dr_grpo")


# ----------------------------------------------------------------------------- advantages


def _groups(rewards, G):
    return [rewards[i : i + G] for i in range(0, len(rewards), G)]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_advantages(scale):
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.1, 0.3]
    G, eps = 4, 1e-4
    adv, group_std = group_relative_advantages(torch.tensor(rewards), G, scale, eps=eps)
    expected = []
    for grp in _groups(rewards, G):
        m = _mean(grp)
        for r in grp:
            if scale == "group":
                expected.append((r - m) / (_std(grp) + eps))
            elif scale == "batch":
                expected.append((r - m) / (_std(rewards) + eps))
            else:
                expected.append(r - m)
    assert adv.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert group_std.tolist() == pytest.approx([_std(g) for g in _groups(rewards, G)], rel=1e-6)
    assert group_std[1].item() == 0.0  # the all-equal group is reported, its advantages are 0
    assert adv[4:8].abs().max().item() == 0.0


def test_group_advantages_bool_and_errors():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert group_relative_advantages(r, 2, True)[0].tolist() == group_relative_advantages(r, 2, "group")[0].tolist()
    assert group_relative_advantages(r, 2, False)[0].tolist() == [-0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="num_generations=3"):
        group_relative_advantages(r, 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_relative_advantages(r, 2, "std")


def test_rloo_leave_one_out_baseline():
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0]
    G = 3
    adv = rloo_advantages(torch.tensor(rewards), G)
    expected = []
    for grp in _groups(rewards, G):
        for i, r in enumerate(grp):
            others = [x for j, x in enumerate(grp) if j != i]
            expected.append(r - sum(others) / len(others))
    assert adv.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        rloo_advantages(torch.tensor(rewards), 1)


def test_normalize_advantages():
    a = [0.5, -1.0, 2.0, 0.0]
    out = normalize_advantages(torch.tensor(a), eps=0.0)
    assert out.tolist() == pytest.approx([(x - _mean(a)) / _std(a) for x in a], rel=1e-6)
    assert normalize_advantages(torch.tensor([3.0])).tolist() == [0.0]


# ----------------------------------------------------------------------------- RLOO loss


def test_rloo_loss_matches_reference_and_reinforce_gradient():
    lp, old, ref, sampler, adv, mask = _batch(5)
    for kw, rkw in [
        ({}, {}),
        (dict(old_logps=old, beta=0.1, ref_logps=ref), dict(old=old.tolist(), beta=0.1, ref=ref.tolist())),
        (dict(old_logps=old, sampler_logps=sampler, is_cap=1.5, epsilon_high=0.3),
         dict(old=old.tolist(), sampler=sampler.tolist(), cap=1.5, eps_high=0.3)),
    ]:
        loss, _ = rloo_loss(lp, adv, mask, **kw)
        rkw.setdefault("old", lp.tolist())
        expected = ref_policy_loss(lp.tolist(), adv.tolist(), mask.tolist(), loss_type="sequence_sum", **rkw)
        assert loss.item() == pytest.approx(expected, rel=1e-9)
    # first iteration: gradient is -A_i / B on each completion token (REINFORCE on sum_t logp)
    x = lp.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(rloo_loss(x, adv, mask)[0], x)
    expected = -adv.unsqueeze(1) * mask / lp.shape[0]
    assert torch.allclose(grad, expected)


def test_sequence_kl():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-0.3, -0.3, -0.3]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert sequence_kl(lp, ref, mask).tolist() == pytest.approx([(-2 + 1) + (-0.5 + 1), 0.0])
