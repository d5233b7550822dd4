"""PPO / REINFORCE++ losses and advantages against written-out, loop-by-loop computations."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.ppo import (explained_variance, gae_advantages, group_mean_baseline, masked_whiten,
                                  ppo_policy_loss, ppo_value_loss, reinforce_pp_advantages, token_rewards)

LENGTHS = [4, 2, 1, 3]


def _mask(lengths=LENGTHS, width=4):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Per row, over its own tokens only: the textbook backward recursion with V = 0 after the end."""
    adv_rows, ret_rows = [], []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        adv = [0.0] * len(r)
        last = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        adv_rows.append(adv)
        ret_rows.append([a + (v[t] if t < n else 0.0) for t, a in enumerate(adv)])
    return torch.tensor(adv_rows), torch.tensor(ret_rows)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (1.0, 0.0), (0.5, 0.8), (0.0, 0.95)])
def test_gae_matches_the_recursion_per_row(gamma, lam):
    torch.manual_seed(0)
    mask = _mask()
    rewards, values = torch.randn(4, 4), torch.randn(4, 4)
    rewards_in = rewards.clone()
    rewards_in[mask == 0] = 123.0  # padding must not leak in
    values_in = values.clone()
    values_in[mask == 0] = -50.0
    adv, ret = gae_advantages(rewards_in, values_in, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, LENGTHS, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-6) and torch.allclose(ret, ref_ret, atol=1e-6)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_special_cases_are_what_they_should_be():
    mask = _mask([3], 3)
    rewards, values = torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]])
    # lam = 1, gamma = 1: A_t = (sum of future rewards) - V_t, returns = Monte-Carlo return (2 everywhere)
    adv, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist() == [[1.5, 1.0, 0.5]] and ret.tolist() == [[2.0, 2.0, 2.0]]
    # lam = 0: one-step TD errors r_t + V_{t+1} - V_t
    adv, _ = gae_advantages(rewards, values, mask, 1.0, 0.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5]]


def test_token_rewards_put_the_score_on_the_last_token_and_kl_everywhere():
    mask = _mask()
    logps = torch.full((4, 4), -1.0)
    ref = torch.full((4, 4), -1.5)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rewards, kl, non_score = token_rewards(scores, logps, ref, mask, kl_coef=0.1, kl_estimator="k1")
    for b, n in enumerate(LENGTHS):
        for t in range(4):
            want_kl = 0.5 if t < n else 0.0
            want = (-0.1 * want_kl) + (scores[b].item() if t == n - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(want_kl)
            assert rewards[b, t].item() == pytest.approx(want)
            assert non_score[b, t].item() == pytest.approx(-0.1 * want_kl)
    _, kl3, _ = token_rewards(scores, logps, ref, mask, kl_coef=0.1, kl_estimator="k3")
    d = -1.5 - (-1.0)
    assert kl3[0, 0].item() == pytest.approx(math.exp(d) - d - 1)
    with pytest.raises(ValueError, match="kl_estimator"):
        token_rewards(scores, logps, ref, mask, 0.1, "k2")


def test_token_rewards_skip_an_empty_completion():
    mask = _mask([0, 2], 2)
    rewards, _, _ = token_rewards(torch.tensor([5.0, 1.0]), torch.zeros(2, 2), None, mask, 0.1)
    assert rewards.tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_masked_whiten_uses_only_masked_tokens():
    mask = _mask([3, 1], 3)
    x = torch.tensor([[1.0, 2.0, 3.0], [7.0, 99.0, 99.0]])
    vals = [1.0, 2.0, 3.0, 7.0]
    mean = sum(vals) / 4
    var = sum((v - mean) ** 2 for v in vals) / 3
    w = masked_whiten(x, mask)
    assert w[0, 0].item() == pytest.approx((1.0 - mean) / math.sqrt(var + 1e-8))
    assert w[1, 0].item() == pytest.approx((7.0 - mean) / math.sqrt(var + 1e-8))
    assert w[1, 1].item() == 0.0
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[0, 2].item() == pytest.approx((3.0 - mean) / math.sqrt(var + 1e-8) + mean)


def test_policy_loss_matches_the_per_token_clip_and_dual_clip():
    mask = _mask([3, 2], 3)
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    new = torch.tensor([[-0.5, -1.1, -3.0], [-0.1, -2.05, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -2.0], [-0.5, 2.0, 0.0]])
    loss, m = ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    terms, clipped, kls = [], [], []
    for b in range(2):
        for t in range(3):
            if not mask[b, t]:
                continue
            r = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            l1, l2 = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(l1, l2))
            clipped.append(float(l2 > l1))
            kls.append(0.5 * (new[b, t].item() - old[b, t].item()) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / 5)
    assert m["clipfrac"].item() == pytest.approx(sum(clipped) / 5)
    assert m["approxkl"].item() == pytest.approx(sum(kls) / 5)
    loss.backward()
    assert new.grad[1, 2] == 0  # padding gets no gradient
    # dual clip: a negative-advantage token with a huge ratio is capped at -c * A
    old1, new1, adv1, mask1 = torch.zeros(1, 1), torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1)
    plain, _ = ppo_policy_loss(new1, old1, adv1, mask1, 0.2)
    dual, _ = ppo_policy_loss(new1, old1, adv1, mask1, 0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx(math.exp(2.0)) and dual.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(new1, old1, adv1, mask1, 0.2, dual_clip=0.5)


def test_value_loss_matches_the_clipped_squared_error():
    mask = _mask([2, 1], 2)
    old = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    new = torch.tensor([[0.5, 0.9], [0.4, 9.0]])
    ret = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    loss, m = ppo_value_loss(new, old, ret, mask, cliprange_value=0.2)
    terms, fracs = [], []
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        v, o, r = new[b, t].item(), old[b, t].item(), ret[b, t].item()
        vc = o + min(max(v - o, -0.2), 0.2)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        fracs.append(float((vc - r) ** 2 > (v - r) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 3)
    assert m["clipfrac"].item() == pytest.approx(sum(fracs) / 3)


def test_reinforce_pp_returns_to_go_with_global_normalization():
    mask = _mask([3, 2], 3)
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 0.5, 7.0]])
    gamma = 0.9
    ref = []
    for row, n in zip(rewards.tolist(), [3, 2]):
        ref.append([sum(gamma ** (s - t) * row[s] for s in range(t, n)) for t in range(n)])
    flat = [g for row in ref for g in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((g - mean) ** 2 for g in flat) / (len(flat) - 1))
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma)
    assert ret[0].tolist() == pytest.approx(ref[0]) and ret[1, :2].tolist() == pytest.approx(ref[1])
    assert ret[1, 2].item() == 0.0
    assert adv[0, 0].item() == pytest.approx((ref[0][0] - mean) / std, rel=1e-5)
    assert adv[1, 1].item() == pytest.approx((ref[1][1] - mean) / std, rel=1e-5) and adv[1, 2].item() == 0.0


def test_group_mean_baseline_centres_each_prompt():
    out = group_mean_baseline(torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0, 1.0]), 2)
    assert out.tolist() == [-1.0, 1.0, 0.0, 0.0, 2.0, -2.0]
    with pytest.raises(ValueError, match="groups"):
        group_mean_baseline(torch.ones(5), 2)


def test_explained_variance():
    mask = _mask([3, 1], 3)
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    mean = torch.full_like(ret, 2.5)
    assert explained_variance(mean, ret, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask).item())
