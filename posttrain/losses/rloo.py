"""RLOO's policy loss and its sequence-level KL penalty.

Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs") model a whole completion as one action: the estimator is
``1/k * sum_i A_i * grad log pi(y_i | x)`` with ``log pi(y|x) = sum_t logp_t`` and the leave-one-out
advantage of `posttrain.losses.advantages.rloo_advantages`. The KL to the reference policy goes either
into the reward (``r - beta * KL(y)``, the paper's choice; see `sequence_kl`) or into the loss (k3).
"""

from __future__ import annotations

import torch

from .grpo import grpo_loss


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-completion KL estimate ``sum_t (logp_t - ref_logp_t)`` over the completion tokens (k1).

    Its expectation under the policy is ``KL(pi(.|x) || pi_ref(.|x))`` of the whole sequence; RLOO
    subtracts ``beta`` times it from the reward. Returns ``[B]``, detached.
    """
    return ((logps - ref_logps).detach() * mask.to(logps.dtype)).sum(-1)


def rloo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    is_cap: float = 2.0,
    is_mode: str = "truncate",
    is_low: float = 0.0,
    is_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE-leave-one-out loss on the sequence log-prob, PPO-clipped per token::

        r_{i,t} = exp(logp_{i,t} - old_logp_{i,t})
        L = mean_i sum_t [ -w_{i,t} * min(r A_i, clip(r, 1-eps, 1+eps_high) A_i) + beta * kl3_{i,t} ]

    With ``old_logps=None`` (one update per generation) ``r = 1`` and the gradient is exactly the
    paper's ``-mean_i A_i * grad sum_t logp_{i,t}``; the clip only matters when a batch is reused
    (``num_iterations > 1``). ``beta`` here is the KL-in-loss variant (k3, `k3_kl`); for the paper's
    KL-in-reward variant pass ``beta=0`` and subtract ``beta * sequence_kl(...)`` from the rewards
    before computing advantages. ``w`` is the truncated IS weight when ``sampler_logps`` is given (masked
outside ``[is_low, is_high]`` with ``is_mode="mask"``).

    This is `posttrain.losses.grpo.grpo_loss` with ``loss_type="sequence_sum"`` (sum over a completion's
    tokens, mean over completions): the same ratio, clip, IS weights and k3 KL, another reduction.
    Returns ``(loss, metrics)`` with the same metric names.
    """
    return grpo_loss(logps, advantages, mask, old_logps=old_logps, ref_logps=ref_logps,
                     sampler_logps=sampler_logps, loss_type="sequence_sum", beta=beta, epsilon=epsilon,
                     epsilon_high=epsilon_high, is_cap=is_cap, is_mode=is_mode, is_low=is_low, is_high=is_high)
