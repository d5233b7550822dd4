"""Kahneman-Tversky Optimization (KTO) on unpaired desirable / undesirable completions.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306.
With the log-ratio ``r(x, y) = log pi(y|x) - log pi_ref(y|x)`` and the reference point
``z_0 = max(0, E_{x', y'}[ r(x', y') ])`` estimated on *mismatched* prompt/completion pairs of the batch
(and never back-propagated through):

    desirable y:    L = lambda_D * (1 - sigma(beta (r(x, y) - z_0)))
    undesirable y:  L = lambda_U * (1 - sigma(beta (z_0 - r(x, y))))

``apo_zero_unpaired`` is the unpaired anchored variant of APO-zero (D'Oosterlinck et al. 2024,
arXiv:2408.06266): ``1 - sigma(beta r)`` for desirable and ``sigma(beta r)`` for undesirable outputs.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")


def kto_kl_estimate(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z_0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))`` over mismatched pairs.

    Detached: the paper treats ``z_0`` as a constant (it only sets the saturation point of the value
    function). In multi-process training the caller averages the mean across processes before clamping.
    """
    return (kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    kl: Tensor | float = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example KTO loss ``[B]`` from summed log-probs ``[B]`` and boolean ``labels`` (True = desirable).

    Rewards reported are ``beta * r`` split by label; ``kl`` is :func:`kto_kl_estimate`'s ``z_0``.
    Metrics: ``kl``, ``rewards/chosen_sum``, ``rewards/rejected_sum``, ``logps/chosen_sum``,
    ``logps/rejected_sum``, ``count/chosen``, ``count/rejected`` (sums and counts, so that batches with
    few or no examples of one label average correctly), plus ``rewards/chosen``/``rewards/rejected``
    batch means where the label occurs.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {', '.join(KTO_LOSS_TYPES)}")
    labels = labels.bool()
    logratios = logps - ref_logps
    kl_t = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device)
    if loss_type == "kto":
        desirable = 1 - torch.sigmoid(beta * (logratios - kl_t))
        undesirable = 1 - torch.sigmoid(beta * (kl_t - logratios))
    else:
        desirable = 1 - torch.sigmoid(beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    rewards = beta * logratios.detach()
    return losses, unpaired_reward_metrics(rewards, logps.detach(), labels, kl=kl_t)


def unpaired_reward_metrics(
    rewards: Tensor, logps: Tensor, labels: Tensor, *, kl: Tensor | None = None
) -> dict[str, Tensor]:
    """Sums, counts and (where defined) means of rewards and log-probs split by label (KTO and BCO)."""
    labels = labels.bool()
    n_c, n_r = labels.sum(), (~labels).sum()
    zero = rewards.new_zeros(())
    metrics = {
        "rewards/chosen_sum": torch.where(labels, rewards, zero).sum(),
        "rewards/rejected_sum": torch.where(labels, zero, rewards).sum(),
        "logps/chosen_sum": torch.where(labels, logps, zero).sum(),
        "logps/rejected_sum": torch.where(labels, zero, logps).sum(),
        "count/chosen": n_c.to(rewards.dtype),
        "count/rejected": n_r.to(rewards.dtype),
    }
    if kl is not None:
        metrics["kl"] = kl.detach()
    if n_c > 0:
        metrics["rewards/chosen"] = metrics["rewards/chosen_sum"] / n_c
    if n_r > 0:
        metrics["rewards/rejected"] = metrics["rewards/rejected_sum"] / n_r
    return metrics
