"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with its loss variants.

For each prompt, ``num_generations`` completions are sampled and scored; each completion's advantage is
its reward relative to its group (`posttrain.losses.group_relative_advantages`), and the policy is
trained with the clipped objective of `posttrain.losses.grpo_loss` (``loss_type`` grpo, bnpo, dr_grpo,
dapo or gspo), optionally with a k3 KL penalty to the reference policy (``beta``). No value model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback, TrainingArguments

from ..losses.advantages import group_relative_advantages
from ..losses.grpo import GRPO_OBJECTIVES, LOSS_TYPES, grpo_loss
from ..losses.grpo_objectives import adaptive_entropy_coef, high_entropy_mask, normalize_then_sum_advantages
from ..losses.policy_gradient import aggregate_token_loss, masked_mean
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online import OnlineTrainer
from ._compat import (CallbacksArg, DatasetArg, EvalDatasetArg, ModelArg, OptimizersArg, PeftConfigArg,
                      ProcessingClassArg, QuantizationArg)
from ._grpo_fields import GRPOTRLFields
from ._online_config import OnlineConfig, RewardArgs, reward_trainer_kwargs
from ._online_trl import OnlineTRLFields, OnlineTRLMixin
from .registry import register_method

__all__ = ["GRPOConfig", "GRPOTrainer"]

GRPO_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t != "sequence_sum") + tuple(GRPO_OBJECTIVES)


@dataclass
class GRPOConfig(GRPOTRLFields, OnlineTRLFields, OnlineConfig):
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
        self._resolve_online_trl_fields()
        self._resolve_grpo_trl_fields()
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


class GRPOTrainer(OnlineTRLMixin, OnlineTrainer):
    """GRPO trainer: ``GRPOTrainer(model, reward_funcs, args, train_dataset, eval_dataset,
    processing_class, reward_processing_classes, peft_config)``.

    ``reward_funcs``: one or a list of callables ``f(prompts, completions, completion_ids, **columns)``,
    built-in names, import paths, or reward models (see `posttrain.online.rewards`). ``engine``: an
    explicit `RolloutEngine` (default: made from the config's engine fields).
    """

    config_class: ClassVar = GRPOConfig
    requires_reward_funcs: ClassVar = True
    _tag_names: ClassVar = ["posttrain", "grpo"]

    def __init__(
        self,
        model: ModelArg,
        reward_funcs: Any = None,
        args: GRPOConfig | TrainingArguments | None = None,
        train_dataset: DatasetArg = None,
        eval_dataset: EvalDatasetArg = None,
        processing_class: ProcessingClassArg = None,
        reward_processing_classes: ProcessingClassArg | list | None = None,
        callbacks: CallbacksArg = None,
        optimizers: OptimizersArg = (None, None),
        quantization_config: QuantizationArg = None,
        peft_config: PeftConfigArg = None,
        tools: list | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        *,
        ref_model: ModelArg | None = None,
        engine: Any = None,
    ) -> None:
        super().__init__(model, reward_funcs, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                         peft_config=peft_config, callbacks=callbacks, optimizers=optimizers, ref_model=ref_model,
                         engine=engine, quantization_config=quantization_config, tools=tools,
                         rollout_func=rollout_func, environment_factory=environment_factory)
        self._setup_online_trl()
        self.entropy_coef = self.args.entropy_coef  # updated each optimizer step with use_adaptive_entropy
        self._last_entropy: float | None = None
        if self.args.cast_lm_head_to_fp32:
            cast_lm_head_to_fp32(self.model)
        if self.args.use_adaptive_entropy:
            self.add_callback(_AdaptiveEntropyCallback(self))

    @property
    def zero_advantage_means_zero_gradient(self) -> bool:
        a = self.args  # every loss type is advantage * (clipped) ratio, plus beta * KL and the entropy bonus
        return a.beta == 0.0 and a.entropy_coef == 0.0 and not a.use_adaptive_entropy

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Each completion's reward relative to its group (completions without a reward: advantage 0); with
        ``multi_objective_aggregation='normalize_then_sum'`` each reward function is normalized on its own first."""
        args: GRPOConfig = self.args
        rewards, group = scored.rewards, scored.group_size
        if group < 2:  # an evaluation with num_generations_eval=1: no group to compare with
            return torch.zeros(len(scored)), {}
        if args.multi_objective_aggregation == "normalize_then_sum" and rewards.per_func.shape[1] > 1:
            weights = torch.as_tensor(rewards.weights, dtype=torch.float32)
            return normalize_then_sum_advantages(rewards.per_func, weights, group,
                                                 valid=rewards.valid), {}
        adv, _ = group_relative_advantages(rewards.total, group, args.scale_rewards, valid=rewards.valid)
        return adv, {}

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch,
                    mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate of `grpo_loss` (or SAPO's / VESPO's objective), with the high-entropy token
        selection and the (adaptive) entropy bonus; DAPO's token normalizer comes from the loop
        (`OnlineTrainer.get_batch_samples`)."""
        args: GRPOConfig = self.args
        entropy = batch.get("policy_entropy")
        token_weights = None
        if args.top_entropy_quantile < 1.0 and entropy is not None:
            token_weights = high_entropy_mask(entropy, mask, args.top_entropy_quantile)
        num_items = batch.num_items_in_batch if self.model.training else None
        loss, metrics = grpo_loss(
            logps, batch.advantages, mask,
            old_logps=batch.get("old_logps"), ref_logps=batch.get("ref_logps"),
            sampler_logps=batch.get("sampler_logps"), loss_type=args.loss_type, beta=args.beta,
            epsilon=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
            is_cap=args.importance_sampling_cap, max_completion_length=args.max_completion_length,
            is_mode=args.importance_sampling_mode, is_low=args.importance_sampling_low,
            is_high=args.importance_sampling_high, is_level=getattr(args, "importance_sampling_is_level", "token"),
            importance_sampling_level=args.importance_sampling_level,
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo={"k_pos": args.vespo_k_pos, "lambda_pos": args.vespo_lambda_pos, "k_neg": args.vespo_k_neg,
                   "lambda_neg": args.vespo_lambda_neg},
            off_policy_mask_threshold=args.off_policy_mask_threshold,
            use_bias_correction_kl=args.use_bias_correction_kl, token_weights=token_weights,
            num_items_in_batch=num_items,
        )
        if entropy is not None and (args.entropy_coef != 0.0 or args.use_adaptive_entropy):
            selected = mask if token_weights is None else token_weights
            current = float(masked_mean(entropy.detach(), selected))
            coef = self.entropy_coef
            if args.use_adaptive_entropy and current > args.entropy_target:
                coef = 0.0  # the bonus applies only at or below the target
            if coef:
                bonus = aggregate_token_loss(entropy, selected, GRPO_OBJECTIVES.get(args.loss_type, args.loss_type)
                                             .replace("gspo", "grpo"),
                                             max_completion_length=args.max_completion_length,
                                             num_items_in_batch=num_items)
                loss = loss - coef * bonus
            if self.model.training:
                self._last_entropy = current
            metrics["entropy_coef"] = torch.tensor(self.entropy_coef)
        return loss, metrics

    def optimizer_step_done(self) -> None:
        """Adaptive entropy control: move the coefficient after each optimizer step."""
        args: GRPOConfig = self.args
        if args.use_adaptive_entropy and self._last_entropy is not None:
            self.entropy_coef = adaptive_entropy_coef(self.entropy_coef, self._last_entropy, args.entropy_target,
                                                      args.entropy_coef_delta, args.entropy_coef_min,
                                                      args.entropy_coef_max)


class _AdaptiveEntropyCallback(TrainerCallback):
    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.optimizer_step_done()


def cast_lm_head_to_fp32(model: torch.nn.Module) -> None:
    """TRL's ``cast_lm_head_to_fp32``: the output head's weights in float32 (log-probs of a low-precision model
    computed against a float32 head). Refused with tied embeddings, where it would also cast the input embedding."""
    from ..ops import unwrap_model

    inner = unwrap_model(model)
    if getattr(getattr(inner, "config", None), "tie_word_embeddings", False):
        raise ValueError("cast_lm_head_to_fp32 needs untied input and output embeddings (tie_word_embeddings=False)")
    inner.get_output_embeddings().float()


register_method(
    "grpo", GRPOConfig, GRPOTrainer,
    help="GRPO: online RL with group-relative advantages from reward functions (grpo/bnpo/dr_grpo/dapo/gspo losses).",
    extra_args=(RewardArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
