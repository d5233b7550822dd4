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
    valid: torch.Tensor | None = None,
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

    ``valid [N]`` (bool, optional) marks the completions that have a reward; the others (every reward
    function returned None) are left out of every mean and std and get advantage 0, as in TRL 1.16.

    Returns ``(advantages [N], group_std [N // G])``; ``group_std`` (always the group's own std, whatever
    the scaling) lets a trainer count and optionally skip groups where every completion got the same
    reward, whose advantages are all zero and carry no learning signal.
    """
    if valid is not None and not bool(valid.all()):
        return _masked_group_relative(rewards, num_generations, scale_rewards, eps, valid)
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


def _masked_std(x: torch.Tensor, keep: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std of ``x`` over the entries where ``keep`` (0 where fewer than two)."""
    count = keep.sum(dim) if dim is not None else keep.sum()
    total = torch.where(keep, x, 0.0).sum(dim) if dim is not None else torch.where(keep, x, 0.0).sum()
    mean = total / count.clamp(min=1)
    centered = torch.where(keep, x - (mean.unsqueeze(-1) if dim is not None else mean), 0.0)
    sq = (centered ** 2).sum(dim) if dim is not None else (centered ** 2).sum()
    return torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))


def _masked_group_relative(rewards: torch.Tensor, g: int, scale: ScaleRewards | bool, eps: float,
                           valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = _grouped(rewards.detach().float(), g)
    keep = valid.to(torch.bool).view(-1, g)
    count = keep.sum(1, keepdim=True)
    mean = torch.where(keep, grouped, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    group_std = _masked_std(grouped, keep, dim=1)
    centered = grouped - mean
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale == "group":
        adv = centered / (group_std.unsqueeze(1) + eps)
    elif scale == "batch":
        adv = centered / (_masked_std(grouped.flatten(), keep.flatten()) + eps)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return torch.where(keep, adv, 0.0).flatten(), group_std


def rloo_advantages(rewards: torch.Tensor, num_generations: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages.

    Each completion's baseline is the mean reward of the *other* ``G - 1`` completions of its prompt::

        A_{g,i} = r_{g,i} - 1/(G-1) * sum_{j != i} r_{g,j}  =  G/(G-1) * (r_{g,i} - mean_j r_{g,j})

    The baseline does not depend on the sample it corrects, so the policy-gradient estimate stays
    unbiased while its variance drops (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019). Needs ``G >= 2``.

    With ``valid [N]``, completions without a reward are left out of every baseline and get advantage 0
    (and so does a completion with no other valid completion in its group).
    """
    if num_generations < 2:
        raise ValueError("RLOO needs num_generations >= 2 (the baseline leaves one completion out)")
    grouped = _grouped(rewards.detach().float(), num_generations)
    if valid is not None and not bool(valid.all()):
        keep = valid.to(torch.bool).view(-1, num_generations)
        total = torch.where(keep, grouped, 0.0).sum(dim=1, keepdim=True)
        others_count = keep.sum(dim=1, keepdim=True) - 1
        others = (total - grouped) / others_count.clamp(min=1)
        return torch.where(keep & (others_count > 0), grouped - others, 0.0).flatten()
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
