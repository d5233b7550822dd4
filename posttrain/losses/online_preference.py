"""Losses of the online preference methods on generated pairs: Online DPO, XPO and Nash-MD.

Pure functions: per-sequence summed log-probs (or per-token log-probs and a mask) in, ``(losses [B],
metrics)`` out. The pairs are made online: completions sampled from the policy (and, for XPO, from the
reference; for Nash-MD, from a geometric mixture of policy and reference), ranked by a judge or rewards.

- Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
  arXiv:2402.04792): the DPO / IPO loss of `posttrain.losses.dpo_loss` on the pair (chosen, rejected)
  the judge picked: `online_dpo_loss`.
- XPO (Xie et al. 2024, "Exploratory Preference Optimization", arXiv:2405.21046): `xpo_loss`.
- Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback", arXiv:2312.00886): `nash_md_loss`.
"""

from __future__ import annotations

import torch

from .dpo import dpo_loss

Tensor = torch.Tensor

__all__ = ["online_dpo_loss", "xpo_loss", "nash_md_loss"]

ONLINE_LOSS_TYPES = ("sigmoid", "ipo")


def online_dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                    ref_rejected_logps: Tensor, *, beta: float, loss_type: str = "sigmoid") -> tuple[Tensor, dict]:
    """Per-pair loss ``[B]`` on generated pairs, from summed log-probs.

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:
    ``sigmoid``: ``-log sigma(beta h)``; ``ipo``: ``(h - 1 / (2 beta))^2`` on the *summed* log-probs (as TRL's
    online trainers compute it; the offline `dpo_loss` length-normalizes IPO instead). Metrics: the implicit
    rewards ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``.
    """
    if loss_type not in ONLINE_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: the online preference methods support {ONLINE_LOSS_TYPES}")
    return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                    loss_type=loss_type)


def xpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             policy_logps_of_ref_samples: Tensor, *, beta: float, alpha: float,
             loss_type: str = "sigmoid") -> tuple[Tensor, dict]:
    """XPO per pair ``[B]``: the online DPO loss plus the exploration term ``alpha * log pi(y_ref | x)``.

    Each pair is one completion sampled from the policy and one from the reference policy, ordered into
    (chosen, rejected) by the judge. ``policy_logps_of_ref_samples`` is the policy's summed log-prob of the
    *reference's* sample: minimizing ``alpha`` times it lowers the policy's likelihood of what the
    reference would say, the optimism bonus that drives exploration (Xie et al. 2024, Alg. 1).
    Metrics: the DPO ones plus ``loss/dpo`` and ``loss/xpo`` (batch means).
    """
    dpo, metrics = online_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                   beta=beta, loss_type=loss_type)
    bonus = alpha * policy_logps_of_ref_samples
    metrics["loss/dpo"] = dpo.detach().mean()
    metrics["loss/xpo"] = bonus.detach().mean()
    return dpo + bonus, metrics


def nash_md_loss(logps: Tensor, ref_logps: Tensor, mask: Tensor, probability: Tensor, *,
                 beta: float) -> tuple[Tensor, dict]:
    """Nash-MD per completion ``[B]`` of a policy sample ``y``, from per-token log-probs ``[B, L]``.

    ``probability [B]`` is ``P(y > y')``, the preference of ``y`` over a sample ``y'`` of the geometric mixture
    ``pi^(1-m) ref^m`` (from a judge or the rewards). With ``S = sum_t log pi(y_t)`` and the per-token log-ratio
    ``d_t = log pi(y_t) - log ref(y_t)`` (held constant in the gradient):

        ``loss = beta * sum_t d_t * log pi(y_t)  -  (P(y > y') - 1/2) * S``

    The second term is the policy gradient of the preference with 1/2 as baseline; the first is the
    score-function gradient of ``beta * KL(pi || ref)`` (Munos et al. 2023, Sec. 7; the expectation of
    ``grad log pi`` alone vanishes). Metrics: ``loss/kl`` (mean ``sum_t d_t``), ``loss/score`` (mean of the
    preference term), ``rewards/probabilities``, ``rewards/win_rate`` (share with ``P > 1/2``).
    """
    m = mask.to(logps.dtype)
    total = (logps * m).sum(-1)
    log_ratio = ((logps - ref_logps) * m).detach()
    score = (probability.to(logps.dtype) - 0.5) * total
    kl_term = (log_ratio * logps).sum(-1)
    losses = beta * kl_term - score
    metrics = {
        "loss/kl": log_ratio.sum(-1).mean(),
        "loss/score": score.detach().mean(),
        "rewards/probabilities": probability.float().mean(),
        "rewards/win_rate": (probability > 0.5).float().mean(),
    }
    return losses, metrics
