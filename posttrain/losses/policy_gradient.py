"""Policy-gradient primitives shared by the online losses (GRPO and its variants, RLOO; PPO and others next).

Pure functions on ``[B, L]`` per-token tensors aligned with ``input_ids`` (docs/internals.md): ``mask`` marks
the completion tokens whose log-probs count, so nothing here shifts. Advantages are ``[B]`` (one per
completion) or ``[B, L]`` (per token); where a function takes them they broadcast against the tokens. A
method's loss (`posttrain.losses.grpo.grpo_loss`, `posttrain.losses.rloo.rloo_loss`) is a composition of:

- `masked_mean`: the mean over the completion tokens;
- `k3_kl`: the k3 estimator of ``KL(pi || pi_ref)`` per token;
- `truncated_importance_weights`: truncated IS weights for a sampler that is not the trained policy;
- `clipped_objective`: PPO's clipped surrogate, with clip-higher and two-sided clipping;
- `aggregate_token_loss`: the per-token loss reduced to a scalar by one of the normalisers of `LOSS_TYPES`;
- `clip_metrics`, `importance_metrics`: what the clip and the IS weights did, for logging.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["LOSS_TYPES", "LossType", "aggregate_token_loss", "clip_metrics", "clipped_objective",
           "importance_metrics", "importance_weights", "k3_kl", "masked_importance_weights", "masked_mean",
           "truncated_importance_weights"]

#: The normalisers of `aggregate_token_loss`, named after the loss that uses each (``gspo`` reduces like ``grpo``;
#: its sequence-level ratio is `posttrain.losses.grpo.grpo_loss`'s business).
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "sequence_sum"]
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "sequence_sum")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is set, whatever their shape::

        masked_mean(v, m) = sum(m * v) / max(sum(m), 1)

    so an empty mask gives 0, not NaN (a batch whose completions are all empty still logs finite metrics)."""
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
    """Share of completion tokens whose objective the clip made constant (no gradient), under TRL's names.

    ``low``: ``r < 1 - eps`` with ``A < 0``; ``high``: ``r > 1 + eps_high`` with ``A > 0``;
    ``region``: either. ``clip_ratio/low_min`` and ``high_max`` carry the same value as the means; the
    trainer's metric log reduces keys ending in ``_min`` / ``_max`` by min / max over micro-batches and
    processes instead of averaging them.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = ratio.detach().expand_as(mask)
    adv = advantages.expand_as(mask)
    low = ((ratio < 1.0 - epsilon) & (adv < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
    low_share, high_share = masked_mean(low, mask), masked_mean(high, mask)
    return {
        "clip_ratio/low_mean": low_share, "clip_ratio/low_min": low_share,
        "clip_ratio/high_mean": high_share, "clip_ratio/high_max": high_share,
        "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask),
    }


def importance_metrics(weights: torch.Tensor, mask: torch.Tensor, logp_diff: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
    """TRL's sampling metrics over the completion tokens (detached): mean, min and max of the importance
    weights applied (``sampling/importance_sampling_ratio/*``), and of ``|log pi - log q|``, the policy's
    log-prob minus the sampler's (``sampling/sampling_logp_difference/{mean,max}``), when given."""
    on = mask.bool()
    picked = weights.detach()[on] if on.any() else weights.new_ones(1)
    out = {
        "sampling/importance_sampling_ratio/mean": masked_mean(weights.detach(), mask),
        "sampling/importance_sampling_ratio/min": picked.min(),
        "sampling/importance_sampling_ratio/max": picked.max(),
    }
    if logp_diff is not None:
        diff = logp_diff.detach().abs()
        out["sampling/sampling_logp_difference/mean"] = masked_mean(diff, mask)
        out["sampling/sampling_logp_difference/max"] = diff[on].max() if on.any() else diff.new_zeros(())
    return out
