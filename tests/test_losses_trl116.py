"""The objectives TRL 1.16 added (GRPO's SAPO, VESPO, off-policy masking, entropy controls, GDPO aggregation,
sequence-level corrections; DPO's f-divergences; CPO's AlphaPO), each against a written-out computation."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.cpo import cpo_loss
from posttrain.losses.dpo import dpo_loss, f_divergence_scores
from posttrain.losses.grpo import grpo_loss
from posttrain.losses.grpo_objectives import (adaptive_entropy_coef, high_entropy_mask, normalize_then_sum_advantages,
                                              off_policy_sequence_mask, sapo_objective, sequence_importance_weights,
                                              vespo_weights)


def _close(a, b, tol=1e-5) -> None:
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol), (a, b)


def test_sapo_gate_values_and_unit_slope_at_one() -> None:
    ratio = torch.tensor([[0.5, 1.0, 1.7]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0, -1.0]])
    out = sapo_objective(ratio, adv, 1.0, 1.05)
    expected = []
    for r, a in zip([0.5, 1.0, 1.7], [2.0, 2.0, -1.0]):
        tau = 1.0 if a > 0 else 1.05
        expected.append(4.0 / tau / (1.0 + math.exp(-tau * (r - 1.0))) * a)
    _close(out.detach()[0], expected)
    out[0, 1].backward()
    _close(ratio.grad[0, 1], 2.0)  # d/dr at r = 1 is A: the plain policy gradient


def test_vespo_weight_is_one_at_ratio_one_and_gamma_shaped() -> None:
    mask = torch.ones(3, 2)
    log_ratio = torch.tensor([[0.0, 0.0], [0.1, 0.2], [-0.5, -0.5]])
    adv = torch.tensor([1.0, 1.0, -1.0])
    phi = vespo_weights(log_ratio, mask, adv)
    _close(phi[0, 0], 1.0)
    for i, (k, lam) in [(1, (2.0, 3.0)), (2, (3.0, 2.0))]:
        w = math.exp(sum(log_ratio[i].tolist()))
        _close(phi[i, 0], math.exp(lam) * w ** k * math.exp(-lam * w))


def test_grpo_vespo_loss_is_weighted_policy_gradient() -> None:
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0], [-0.5, -0.9]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, metrics = grpo_loss(logps, adv, mask, old_logps=old, loss_type="vespo")
    phi = vespo_weights((logps - old).detach(), mask, adv)
    expected = -(phi * adv[:, None] * logps).sum() / mask.sum()  # dapo aggregation, local token count
    _close(loss.detach(), expected.detach())
    assert "vespo/phi_seq_mean" in metrics


def test_off_policy_mask_drops_only_negative_far_sequences() -> None:
    logps = torch.zeros(3, 2)
    sampler = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.1, 0.1]])  # mean KL 1, 1, 0.1
    adv = torch.tensor([1.0, -1.0, -1.0])
    keep = off_policy_sequence_mask(adv, logps, sampler, torch.ones(3, 2), threshold=0.5)
    assert keep.squeeze(-1).tolist() == [1.0, 0.0, 1.0]


def test_high_entropy_mask_keeps_top_share_of_loss_tokens() -> None:
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # the 7.0 is padding and must not count
    kept = high_entropy_mask(entropy, mask, 0.25)
    values = sorted(v for v, m in zip(entropy.flatten().tolist(), mask.flatten().tolist()) if m)
    threshold = torch.quantile(torch.tensor(values), 0.75).item()
    expected = [[bool(m) and v >= threshold for v, m in zip(er, mr)] for er, mr in zip(entropy.tolist(), mask.tolist())]
    assert kept.tolist() == expected and sum(map(sum, expected)) == 2
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()


def test_adaptive_entropy_coef_steps_and_bounds() -> None:
    assert adaptive_entropy_coef(0.1, entropy=0.1, target=0.2, delta=0.05, low=0.0, high=0.12) == 0.12
    assert adaptive_entropy_coef(0.1, entropy=0.3, target=0.2, delta=0.05, low=0.0, high=1.0) == pytest.approx(0.05)
    assert adaptive_entropy_coef(0.01, entropy=0.3, target=0.2, delta=0.05, low=0.0, high=1.0) == 0.0


def test_normalize_then_sum_matches_written_out_gdpo() -> None:
    per_func = torch.tensor([[1.0, 10.0], [0.0, 30.0], [1.0, 0.0], [1.0, 20.0]])
    weights = torch.tensor([1.0, 0.5])
    adv = normalize_then_sum_advantages(per_func, weights, num_generations=2)
    summed = []
    for g in range(2):
        rows = per_func[2 * g: 2 * g + 2]
        normalized = (rows - rows.mean(0)) / (rows.std(0) + 1e-4)
        summed += (normalized * weights).sum(1).tolist()
    s = torch.tensor(summed)
    _close(adv, (s - s.mean()) / (s.std() + 1e-4))


def test_sequence_importance_weights_truncate_and_mask() -> None:
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -1.5], [-1.0, -1.1]])  # rho = e^1, e^0.1
    mask = torch.ones(2, 2)
    _close(sequence_importance_weights(old, sampler, mask, "truncate", high=2.0).squeeze(-1), [2.0, math.exp(0.1)])
    _close(sequence_importance_weights(old, sampler, mask, "mask", low=0.5, high=2.0).squeeze(-1),
           [0.0, math.exp(0.1)])


def test_sequence_level_importance_sampling_equals_gspo_ratio() -> None:
    torch.manual_seed(0)
    logps = (-torch.rand(3, 4)).requires_grad_()
    old = logps.detach() - 0.05 * torch.randn(3, 4)
    adv, mask = torch.tensor([1.0, -0.5, 0.2]), torch.ones(3, 4)
    a, _ = grpo_loss(logps, adv, mask, old_logps=old, loss_type="grpo", importance_sampling_level="sequence")
    b, _ = grpo_loss(logps, adv, mask, old_logps=old, loss_type="gspo")
    _close(a.detach(), b.detach())
    c, _ = grpo_loss(logps, adv, mask, old_logps=old, loss_type="grpo")
    assert not torch.allclose(a, c)


def test_bias_corrected_kl_gradient_adds_kl_times_score() -> None:
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask, adv = torch.ones(1, 2), torch.zeros(1)
    grads = []
    for corrected in (False, True):
        x = logps.detach().clone().requires_grad_()
        loss, _ = grpo_loss(x, adv, mask, ref_logps=ref, beta=1.0, loss_type="bnpo",
                            use_bias_correction_kl=corrected)
        loss.backward()
        grads.append(x.grad.clone())
    k3 = torch.exp(ref - logps.detach()) - (ref - logps.detach()) - 1
    # d(kl * r)/dlogp at r = 1 (on-policy) = dkl/dlogp + kl: the extra term is the KL itself, per token / 2 tokens
    _close(grads[1] - grads[0], k3 / 2)


def test_sapo_loss_type_in_grpo_loss() -> None:
    logps = torch.tensor([[-1.0, -1.2]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.0]])
    adv, mask = torch.tensor([1.5]), torch.ones(1, 2)
    loss, _ = grpo_loss(logps, adv, mask, old_logps=old, loss_type="sapo")
    r = torch.exp(logps.detach() - old)
    expected = -(4.0 / (1 + torch.exp(-(r - 1.0))) * 1.5).mean()  # tau_pos = 1, grpo aggregation
    _close(loss.detach(), expected)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_dpo_logit(kind: str) -> None:
    c, r = torch.tensor([0.3, -0.2]), torch.tensor([-0.4, 0.1])  # log-ratios (ref = 0)
    alpha = 0.3

    def score(t: float) -> float:
        u = math.exp(t)
        if kind == "forward_kl":
            return 1 - 1 / u
        if kind == "js_divergence":
            return math.log(2 * u / (1 + u))
        return (u ** (alpha - 1) - 1) / (alpha - 1)

    _close(f_divergence_scores(c, kind, alpha), [score(t) for t in c.tolist()])
    zeros = torch.zeros(2)
    losses, _ = dpo_loss(c, r, zeros, zeros, beta=0.5, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    expected = [-math.log(1 / (1 + math.exp(-0.5 * (score(a) - score(b))))) for a, b in zip(c.tolist(), r.tolist())]
    _close(losses, expected)


def test_f_divergence_refuses_loss_types_without_a_log_ratio_logit() -> None:
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="f_divergence_type"):
        dpo_loss(z, z, z, z, loss_type="nca_pair", f_divergence_type="forward_kl")


def test_cpo_alphapo_reward_shape() -> None:
    chosen, rejected = torch.tensor([-2.0]), torch.tensor([-3.0])
    alpha, beta = 0.5, 0.2
    losses, _ = cpo_loss(chosen, rejected, beta=beta, alpha=alpha)
    shaped = [(1 - math.exp(-2.0) ** -alpha) / alpha, (1 - math.exp(-3.0) ** -alpha) / alpha]
    _close(losses, [-math.log(1 / (1 + math.exp(-beta * (shaped[0] - shaped[1]))))])
    plain, _ = cpo_loss(chosen, rejected, beta=beta, alpha=0.0)
    _close(plain, [-math.log(1 / (1 + math.exp(-beta * 1.0)))])
