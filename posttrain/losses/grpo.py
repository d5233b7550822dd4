"""Clipped policy-gradient loss of GRPO and its variants (bnpo, Dr. GRPO, DAPO, GSPO).

All per-token tensors are ``[B, L]`` and aligned with ``input_ids`` (see docs/internals.md): ``mask``
marks the completion tokens whose log-probs count, so nothing here shifts. ``advantages`` is ``[B]``,
one per completion. The building blocks (`masked_mean`, `k3_kl`, `truncated_importance_weights`,
`clipped_objective`, `aggregate_token_loss`) live in `posttrain.losses.policy_gradient`, shared with RLOO.
"""

from __future__ import annotations

import torch

from .grpo_objectives import (off_policy_sequence_mask, sapo_objective, sequence_importance_weights,
                              sequence_log_ratio, vespo_weights)
from .policy_gradient import (LOSS_TYPES, LossType, aggregate_token_loss, clip_metrics, clipped_objective,
                              importance_metrics, importance_weights, k3_kl, masked_mean)

__all__ = ["LOSS_TYPES", "GRPO_OBJECTIVES", "grpo_loss"]

#: loss types beyond the clipped surrogate, and the token aggregation each uses
GRPO_OBJECTIVES = {"sapo": "grpo", "vespo": "dapo"}


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
    is_level: str = "token",
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo: dict[str, float] | None = None,
    off_policy_mask_threshold: float | None = None,
    use_bias_correction_kl: bool = False,
    token_weights: torch.Tensor | None = None,
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

    ``importance_sampling_level="sequence"`` uses GSPO's sequence ratio with any ``loss_type``'s aggregation.
    ``loss_type="sapo"`` replaces the clip by SAPO's soft gate (`sapo_objective`, temperatures
    ``sapo_temperature_pos/neg``; aggregated as ``grpo``); ``loss_type="vespo"`` is ``-phi * A * logp`` with
    VESPO's detached sequence weight (`vespo_weights`, parameters ``vespo`` = ``{k_pos, lambda_pos, k_neg,
    lambda_neg}``; the sampler correction is part of ``phi``; aggregated as ``dapo``).
    ``is_level="sequence"`` makes the sampler correction one weight per completion
    (`sequence_importance_weights`). ``off_policy_mask_threshold`` drops negative-advantage sequences too far
    from the sampler (`off_policy_sequence_mask`). ``use_bias_correction_kl`` multiplies the KL term by the
    (differentiable) importance ratio, making its gradient the unbiased reverse-KL gradient (DeepSeek-V3.2,
    arXiv:2512.02556). ``token_weights`` ``[B, L]`` (e.g. the high-entropy token mask) multiply the policy term.

    Returns ``(loss, metrics)``; metrics (detached, TRL's names) are ``clip_ratio/{low_mean, low_min,
    high_mean, high_max, region_mean}``, ``kl`` when a reference is used, and ``sampling/*`` when
    ``sampler_logps`` is given (see `importance_metrics`).
    """
    if loss_type not in LOSS_TYPES and loss_type not in GRPO_OBJECTIVES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES + tuple(GRPO_OBJECTIVES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: expected 'token' or 'sequence'")
    maskf = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    adv = advantages.to(logps.dtype).unsqueeze(-1)  # [B, 1]
    log_ratio = logps - old
    if loss_type == "gspo" or importance_sampling_level == "sequence":
        ratio = torch.exp(sequence_log_ratio(log_ratio, maskf))  # [B, 1], broadcast over tokens
    else:
        ratio = torch.exp(log_ratio)
    metrics: dict[str, torch.Tensor] = {}
    if loss_type == "sapo":
        per_token = -sapo_objective(ratio, adv, sapo_temperature_pos, sapo_temperature_neg).expand_as(logps)
    elif loss_type == "vespo":
        gap = None if sampler_logps is None else torch.nan_to_num(old.detach() - sampler_logps, nan=0.0)
        phi = vespo_weights(log_ratio.detach(), maskf, advantages, sampler_log_ratio=gap, **(vespo or {}))
        per_token = -phi * adv * logps
        metrics["vespo/phi_seq_mean"] = phi.mean()
    else:
        per_token = -clipped_objective(ratio, adv, epsilon, epsilon_high, delta).expand_as(logps)
    if token_weights is not None:
        per_token = per_token * token_weights.to(per_token.dtype)
    if off_policy_mask_threshold is not None:
        reference = old if sampler_logps is None else sampler_logps
        keep = off_policy_sequence_mask(advantages, logps, reference, maskf, off_policy_mask_threshold)
        per_token = per_token * keep
        metrics["off_policy_masked_frac"] = 1.0 - keep.mean()

    if sampler_logps is not None and loss_type != "vespo":
        high = is_cap if is_high is None else is_high
        if is_level == "sequence":
            weights = sequence_importance_weights(old, sampler_logps, maskf, is_mode, low=is_low,
                                                  high=is_cap if is_mode == "truncate" else high).expand_as(logps)
        elif loss_type == "gspo":
            gap = ((old.detach() - sampler_logps) * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1.0)
            weights = importance_weights(gap, torch.zeros_like(gap), is_mode, cap=is_cap, low=is_low,
                                         high=is_high).expand_as(logps)
        else:
            weights = importance_weights(old, sampler_logps, is_mode, cap=is_cap, low=is_low, high=is_high)
        per_token = per_token * weights
        metrics.update(importance_metrics(weights, maskf, logp_diff=old.detach() - sampler_logps))
    if beta != 0.0 and ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
        metrics["kl"] = masked_mean(kl.detach(), maskf)

    loss = aggregate_token_loss(
        per_token,
        maskf,
        GRPO_OBJECTIVES.get(loss_type, loss_type),
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    metrics.update(clip_metrics(ratio, adv, maskf, epsilon, epsilon_high))
    return loss, metrics
