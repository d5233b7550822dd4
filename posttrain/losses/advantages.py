"""Advantage estimators for online RL without a value function.

Rewards arrive as one flat tensor ``[N]`` grouped by prompt: prompt ``i``'s ``G = num_generations``
completions are contiguous (``rewards.view(-1, G)`` gives one row per prompt), which is the order a
`posttrain.online.Rollout` uses. Every function here is pure: no gradients flow through rewards.
"""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of num_generations={num_generations}"
        )
    return rewards.view(-1, num_generations)


def group_relative_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards | bool = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of GRPO.

    For prompt ``g`` with completions ``i = 1..G`` and rewards ``r_{g,i}``::

        A_{g,i} = (r_{g,i} - mean_j r_{g,j}) / (s + eps)

    where the scale ``s`` depends on ``scale_rewards``:

    - ``"group"``: ``s = std_j r_{g,j}``, the group's own standard deviation (GRPO: Shao et al. 2024,
      "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models").
    - ``"batch"``: ``s = std`` of all ``N`` rewards in the batch; the mean stays per group. This keeps
      the advantage's sign and per-group centring but stops near-constant groups from being blown up.
    - ``"none"``: ``s = 1`` and no ``eps``: ``A = r - mean`` (Dr. GRPO: Liu et al. 2025,
      "Understanding R1-Zero-Like Training: A Critical Perspective", which shows that the std division
      biases the update toward too-easy and too-hard questions).

    Standard deviations are the unbiased (Bessel-corrected) estimate, as ``torch.std``; a group of one
    has std 0. ``True``/``False`` are accepted as ``"group"``/``"none"``.

    Returns ``(advantages [N], group_std [N // G])``; ``group_std`` (always the group's own std, whatever
    the scaling) lets a trainer count and optionally skip groups where every completion got the same
    reward, whose advantages are all zero and carry no learning signal.
    """
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    grouped = _grouped(rewards.detach().float(), num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1) if num_generations > 1 else torch.zeros(grouped.shape[0])
    centered = grouped - mean
    if scale_rewards == "group":
        adv = centered / (group_std.unsqueeze(1) + eps)
    elif scale_rewards == "batch":
        batch_std = grouped.flatten().std() if grouped.numel() > 1 else grouped.new_zeros(())
        adv = centered / (batch_std + eps)
    elif scale_rewards == "none":
        adv = centered
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return adv.flatten(), group_std


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages.

    Each completion's baseline is the mean reward of the *other* ``G - 1`` completions of its prompt::

        A_{g,i} = r_{g,i} - 1/(G-1) * sum_{j != i} r_{g,j}  =  G/(G-1) * (r_{g,i} - mean_j r_{g,j})

    The baseline does not depend on the sample it corrects, so the policy-gradient estimate stays
    unbiased while its variance drops (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019). Needs ``G >= 2``.
    """
    if num_generations < 2:
        raise ValueError("RLOO needs num_generations >= 2 (the baseline leaves one completion out)")
    grouped = _grouped(rewards.detach().float(), num_generations)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - others).flatten()


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten advantages over the batch: ``(A - mean(A)) / (std(A) + eps)``.

    A common variance-reduction step for RLOO/PPO-style updates; makes the step size independent of
    the reward scale. Unbiased std; a single advantage is only centred.
    """
    adv = advantages.detach().float()
    centered = adv - adv.mean()
    if adv.numel() < 2:
        return centered
    return centered / (adv.std() + eps)
