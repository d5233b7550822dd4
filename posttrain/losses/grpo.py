"""Clipped policy-gradient loss of GRPO and its variants (bnpo, Dr. GRPO, DAPO, GSPO).

All per-token tensors are ``[B, L]`` and aligned with ``input_ids`` (see docs/internals.md): ``mask``
marks the completion tokens whose log-probs count, so nothing here shifts. ``advantages`` is ``[B]``,
one per completion. The building blocks (`k3_kl`, `truncated_importance_weights`, `clipped_objective`,
`aggregate_token_loss`) are public so other online losses (RLOO, PPO) reuse them.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "sequence_sum"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "sequence_sum")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of ``KL(pi || pi_ref)`` on tokens sampled from ``pi``::

        kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    Non-negative, unbiased in expectation, and lower variance than ``logp - ref`` (Schulman 2020,
    "Approximating KL Divergence"; used as GRPO's KL penalty by Shao et al. 2024, DeepSeekMath).
    """
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1.0


def truncated_importance_weights(
    old_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights correcting for sampler/trainer mismatch::

        w_t = min(exp(old_logp_t - sampler_logp_t), cap)

    The completions were sampled by an engine (vLLM, a rollout server) whose numerics or weights
    differ slightly from the training model's; ``old_logp`` is the training model's log-prob of the same
    token at generation time. Truncating at ``cap`` bounds the variance (truncated IS, Ionides 2008;
    applied to RL for LLMs by Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"). Detached: a weight, not a gradient path.
    """
    return torch.exp(old_logps.detach() - sampler_logps.detach()).clamp(max=cap)


def masked_importance_weights(
    old_logps: torch.Tensor, sampler_logps: torch.Tensor, low: float, high: float
) -> torch.Tensor:
    """Masked importance-sampling weights: the IS ratio where it lies in ``[low, high]``, 0 elsewhere::

        rho_t = exp(old_logp_t - sampler_logp_t)
        w_t   = rho_t  if low <= rho_t <= high  else 0

    Unlike truncation (`truncated_importance_weights`), a token whose ratio is far outside the trust band
    (a stale or mismatched sampler) is left out of the gradient instead of being kept at the cap: the
    "masked IS" / token-level rejection of Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"; TRL's ``token_mask``), used for asynchronous, stale rollouts. Detached.
    """
    ratio = torch.exp(old_logps.detach() - sampler_logps.detach())
    return torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))


def importance_weights(
    old_logps: torch.Tensor, sampler_logps: torch.Tensor, mode: str = "truncate", *, cap: float = 2.0,
    low: float = 0.0, high: float | None = None,
) -> torch.Tensor:
    """The sampler-correction weights of ``mode``: ``"truncate"`` (`truncated_importance_weights` at
    ``cap``) or ``"mask"`` (`masked_importance_weights` outside ``[low, high]``, ``high`` default ``cap``)."""
    if mode == "truncate":
        return truncated_importance_weights(old_logps, sampler_logps, cap)
    if mode == "mask":
        return masked_importance_weights(old_logps, sampler_logps, low, cap if high is None else high)
    raise ValueError(f"importance-sampling mode {mode!r}: expected 'truncate' or 'mask'")


def clipped_objective(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None = None,
    delta: float | None = None,
) -> torch.Tensor:
    """PPO's clipped surrogate (to maximise), elementwise::

        J = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)

    (Schulman et al. 2017, PPO). ``epsilon_high`` (default ``epsilon``) lets the upper bound differ
    ("clip-higher", Yu et al. 2025, DAPO), so low-probability tokens with positive advantage can grow.
    ``delta`` adds an upper clip ``min(r, delta)`` to the unclipped term, so a huge ratio on a
    negative-advantage token cannot dominate the update either ("two-sided" clipping, as in
    Team et al. 2025, INTELLECT-2).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    unclipped_ratio = ratio.clamp(max=delta) if delta is not None else ratio
    clipped_ratio = ratio.clamp(1.0 - epsilon, 1.0 + eps_high)
    return torch.min(unclipped_ratio * advantages, clipped_ratio * advantages)


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, L]`` per-token loss to a scalar; ``loss_type`` picks the normaliser.

    - ``grpo``, ``gspo``: mean over each sequence's tokens, then mean over sequences (Shao et al. 2024).
      Long completions weigh less per token.
    - ``bnpo``: mean over all completion tokens of the local batch.
    - ``dr_grpo``: ``sum / (B * max_completion_length)``, a constant normaliser with no length bias
      (Liu et al. 2025, Dr. GRPO).
    - ``dapo``: token mean over the *global* batch: ``sum / num_items_in_batch``, the number of
      completion tokens summed over every micro-batch and process that share one optimizer step
      (Yu et al. 2025, DAPO); falls back to the local token count.
    - ``sequence_sum``: sum over each sequence's tokens, mean over sequences: REINFORCE on the whole
      sequence's log-prob, as RLOO treats a completion as one action (Ahmadian et al. 2024).
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_type in ("grpo", "gspo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return masked.sum() / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
        denom = torch.as_tensor(denom, dtype=per_token.dtype, device=per_token.device)
        return masked.sum() / denom.clamp(min=1.0)
    if loss_type == "sequence_sum":
        return masked.sum(-1).mean()
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def clip_metrics(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    epsilon_high: float | None,
) -> dict[str, torch.Tensor]:
    """Share of completion tokens whose objective the clip made constant (no gradient).

    ``low``: ``r < 1 - eps`` with ``A < 0``; ``high``: ``r > 1 + eps_high`` with ``A > 0``;
    ``region``: either.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = ratio.detach().expand_as(mask)
    adv = advantages.expand_as(mask)
    low = ((ratio < 1.0 - epsilon) & (adv < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
    return {
        "clip_ratio/low": masked_mean(low, mask),
        "clip_ratio/high": masked_mean(high, mask),
        "clip_ratio/region": masked_mean(torch.maximum(low, high), mask),
    }


def importance_metrics(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean, min and max of the importance weights over the completion tokens (detached)."""
    on = mask.bool()
    picked = weights.detach()[on] if on.any() else weights.new_ones(1)
    return {
        "is_weight/mean": masked_mean(weights.detach(), mask),
        "is_weight/min": picked.min(),
        "is_weight/max": picked.max(),
    }


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

    Returns ``(loss, metrics)``; metrics (detached) are ``clip_ratio/{low,high,region}``, ``kl`` when a
    reference is used, and ``is_weight/{mean,min,max}`` when ``sampler_logps`` is given.
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
        metrics.update(importance_metrics(weights, maskf))
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
