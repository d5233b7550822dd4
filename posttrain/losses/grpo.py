"""Clipped policy-gradient loss of GRPO and its variants (bnpo, Dr. GRPO, DAPO, GSPO).

All per-token tensors are ``[B, L]`` and aligned with ``input_ids`` (see docs/internals.md): ``mask``
marks the completion tokens whose log-probs count, so nothing here shifts. ``advantages`` is ``[B]``,
one per completion. The building blocks (`masked_mean`, `k3_kl`, `truncated_importance_weights`,
`clipped_objective`, `aggregate_token_loss`) live in `posttrain.losses.policy_gradient`, shared with RLOO.
"""

from __future__ import annotations

import torch

from .policy_gradient import (LOSS_TYPES, LossType, aggregate_token_loss, clip_metrics, clipped_objective,
                              importance_metrics, importance_weights, k3_kl, masked_mean)

__all__ = ["LOSS_TYPES", "grpo_loss"]


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    loss_type: LossType = "dapo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    is_cap: float = 2.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    is_mode: str = "truncate",
    is_low: float = 0.0,
    is_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped policy loss with optional KL penalty and importance-sampling correction.

    Per completion token ``t`` of completion ``i`` (Shao et al. 2024, DeepSeekMath)::

        r_{i,t}  = exp(logp_{i,t} - old_logp_{i,t})
        l_{i,t}  = -w_{i,t} * min(r A_i, clip(r, 1-eps, 1+eps_high) A_i) + beta * kl3_{i,t}

    reduced to a scalar by `aggregate_token_loss` according to ``loss_type``. ``old_logp`` is the
    policy's log-prob when the completions were generated (``None``: ``logps.detach()``, so ``r = 1``
    and the gradient is the plain policy gradient, the ``num_iterations = 1`` case). ``kl3`` is `k3_kl`
    to ``ref_logps`` (skipped when ``beta == 0`` or no reference). ``w`` is
    `truncated_importance_weights` ``(old_logp, sampler_logp, is_cap)`` when ``sampler_logps`` is given,
    else 1; ``is_mode="mask"`` uses `masked_importance_weights` ``(old_logp, sampler_logp, is_low,
    is_high)`` instead (0 outside the band).

    ``loss_type="gspo"`` replaces the token ratio with the sequence-level geometric mean
    ``s_i = exp(mean_t(logp_{i,t} - old_logp_{i,t}))``, clipped once per sequence (Zheng et al. 2025,
    "Group Sequence Policy Optimization"; the paper uses much smaller clip ranges, e.g. eps = 3e-4,
    eps_high = 4e-4); its IS weight is the sequence-level geometric mean as well, then aggregated as
    ``grpo``.

    Returns ``(loss, metrics)``; metrics (detached, TRL's names) are ``clip_ratio/{low_mean, low_min,
    high_mean, high_max, region_mean}``, ``kl`` when a reference is used, and ``sampling/*`` when
    ``sampler_logps`` is given (see `importance_metrics`).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    maskf = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.to(logps.dtype).unsqueeze(-1)  # [B, 1]
    log_ratio = logps - old
    if loss_type == "gspo":
        seq_log_ratio = (log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)
        ratio = torch.exp(seq_log_ratio).unsqueeze(-1)  # [B, 1], broadcast over tokens
    else:
        ratio = torch.exp(log_ratio)
    per_token = -clipped_objective(ratio, adv, epsilon, epsilon_high, delta).expand_as(logps)

    metrics: dict[str, torch.Tensor] = {}
    if sampler_logps is not None:
        if loss_type == "gspo":
            gap = ((old.detach() - sampler_logps) * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1.0)
            weights = importance_weights(gap, torch.zeros_like(gap), is_mode, cap=is_cap, low=is_low,
                                         high=is_high).expand_as(logps)
        else:
            weights = importance_weights(old, sampler_logps, is_mode, cap=is_cap, low=is_low, high=is_high)
        per_token = per_token * weights
        metrics.update(importance_metrics(weights, maskf, logp_diff=old.detach() - sampler_logps))
    if beta != 0.0 and ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), maskf)

    loss = aggregate_token_loss(
        per_token,
        maskf,
        loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    metrics.update(clip_metrics(ratio, adv, maskf, epsilon, epsilon_high))
    return loss, metrics
