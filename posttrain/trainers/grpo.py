"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with its loss variants.

For each prompt, ``num_generations`` completions are sampled and scored; each completion's advantage is
its reward relative to its group (`posttrain.losses.group_relative_advantages`), and the policy is
trained with the clipped objective of `posttrain.losses.grpo_loss` (``loss_type`` grpo, bnpo, dr_grpo,
dapo or gspo), optionally with a k3 KL penalty to the reference policy (``beta``). No value model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..losses.advantages import group_relative_advantages
from ..losses.grpo import LOSS_TYPES, grpo_loss
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online import OnlineTrainer
from ._online_config import OnlineConfig, RewardArgs, reward_trainer_kwargs
from .registry import register_method

__all__ = ["GRPOConfig", "GRPOTrainer"]

GRPO_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t != "sequence_sum")


@dataclass
class GRPOConfig(OnlineConfig):
    """Configuration of `GRPOTrainer` (field names follow TRL's GRPOConfig where they overlap)."""

    loss_type: str = field(default="dapo", metadata={"help": (
        "grpo: per-sequence token mean, then mean over sequences; bnpo: token mean over the micro-batch; "
        "dr_grpo: token sum / (batch * max_completion_length); dapo: token mean over the optimizer step's "
        "global batch; gspo: sequence-level (geometric-mean) importance ratio.")})
    scale_rewards: str = field(default="group", metadata={"help": (
        "Divide the group-centred rewards by the group's std ('group'), the batch's std ('batch'), or not "
        "at all ('none', Dr. GRPO). True and False (TRL's older booleans) mean 'group' and 'none'.")})
    delta: float | None = field(default=None, metadata={"help": (
        "Two-sided clipping: also cap the unclipped ratio at delta (> 1 + epsilon_high), so negative-advantage "
        "tokens with huge ratios cannot dominate.")})
    skip_zero_variance_groups: bool = field(default=False, metadata={"help": (
        "Leave out of the loss the groups whose completions all got the same reward (their advantages are "
        "0); counted in frac_reward_zero_std.")})

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool) or self.scale_rewards in ("true", "false", "True", "False"):
            self.scale_rewards = "group" if str(self.scale_rewards).lower() == "true" else "none"
        super().__post_init__()
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: expected one of {GRPO_LOSS_TYPES}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: expected 'group', 'batch' or 'none'")
        upper = 1.0 + (self.epsilon if self.epsilon_high is None else self.epsilon_high)
        if self.delta is not None and self.delta <= upper:
            raise ValueError(f"delta={self.delta} must exceed 1 + epsilon_high = {upper}")
        if self.num_generations < 2 and self.scale_rewards != "none":
            raise ValueError("GRPO needs num_generations >= 2 (advantages are relative to the group)")


class GRPOTrainer(OnlineTrainer):
    """GRPO trainer: ``GRPOTrainer(model, reward_funcs, args, train_dataset, eval_dataset,
    processing_class, reward_processing_classes, peft_config)``.

    ``reward_funcs``: one or a list of callables ``f(prompts, completions, completion_ids, **columns)``,
    built-in names, import paths, or reward models (see `posttrain.online.rewards`). ``engine``: an
    explicit `RolloutEngine` (default: made from the config's engine fields).
    """

    config_class: ClassVar = GRPOConfig
    requires_reward_funcs: ClassVar = True
    _tag_names: ClassVar = ["posttrain", "grpo"]

    @property
    def zero_advantage_means_zero_gradient(self) -> bool:
        return self.args.beta == 0.0  # every loss type is advantage * (clipped) ratio, plus beta * KL

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Each completion's reward relative to its group (completions without a reward: advantage 0)."""
        args: GRPOConfig = self.args
        rewards = scored.rewards
        adv, _ = group_relative_advantages(rewards.total, args.num_generations, args.scale_rewards, valid=rewards.valid)
        return adv, {}

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch,
                    mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate of `grpo_loss`; DAPO's token normalizer comes from the loop
        (`OnlineTrainer.get_batch_samples`)."""
        args: GRPOConfig = self.args
        return grpo_loss(
            logps, batch.advantages, mask,
            old_logps=batch.get("old_logps"), ref_logps=batch.get("ref_logps"),
            sampler_logps=batch.get("sampler_logps"), loss_type=args.loss_type, beta=args.beta,
            epsilon=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
            is_cap=args.importance_sampling_cap, max_completion_length=args.max_completion_length,
            is_mode=args.importance_sampling_mode, is_low=args.importance_sampling_low,
            is_high=args.importance_sampling_high,
            num_items_in_batch=batch.num_items_in_batch if self.model.training else None,
        )


register_method(
    "grpo", GRPOConfig, GRPOTrainer,
    help="GRPO: online RL with group-relative advantages from reward functions (grpo/bnpo/dr_grpo/dapo/gspo losses).",
    extra_args=(RewardArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
