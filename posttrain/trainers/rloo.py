"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs").

Each prompt gets ``num_generations = k`` completions; a completion's baseline is the mean reward of the
other ``k - 1`` (`posttrain.losses.rloo_advantages`), and the policy gradient treats the whole completion
as one action (`posttrain.losses.rloo_loss`). The KL to the reference policy goes into the reward
(``kl_in_reward=True``, the paper's choice: ``r - beta * sum_t (logp - ref_logp)``) or into the loss (k3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ..losses.advantages import normalize_advantages, rloo_advantages
from ..losses.rloo import rloo_loss, sequence_kl
from ..online.logprobs import batched_completion_logps
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online import OnlineTrainer
from ._compat import (CallbacksArg, DatasetArg, EvalDatasetArg, ModelArg, OptimizersArg, PeftConfigArg,
                      ProcessingClassArg, QuantizationArg)
from ._online_config import OnlineConfig, RewardArgs, reward_trainer_kwargs
from ._online_trl import OnlineTRLFields, OnlineTRLMixin
from .registry import register_method

__all__ = ["RLOOConfig", "RLOOTrainer"]


@dataclass
class RLOOConfig(OnlineTRLFields, OnlineConfig):
    """Configuration of `RLOOTrainer`."""

    num_generations: int = field(default=4, metadata={"help": "Completions per prompt (RLOO's k, >= 2)."})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient to the reference policy (0: no reference)."})
    kl_in_reward: bool = field(default=True, metadata={"help": (
        "Subtract beta * sequence KL from the reward (the RLOO paper); False: a k3 KL term in the loss.")})
    normalize_advantages: bool = field(default=False, metadata={"help": (
        "Whiten the advantages over the generation batch (mean 0, std 1).")})
    reward_clip_range: list[float] | None = field(default=None, metadata={
        "help": "Clip each reward into [low, high] (two numbers; a (low, high) tuple in Python) before the KL and "
                "the baseline (None: no clipping)."})

    def __post_init__(self) -> None:
        self._resolve_online_trl_fields()
        if self.reward_clip_range is not None:
            if len(self.reward_clip_range) != 2 or float(self.reward_clip_range[0]) > float(self.reward_clip_range[1]):
                raise ValueError(f"reward_clip_range={self.reward_clip_range}: expected (low, high) with low <= high")
            self.reward_clip_range = (float(self.reward_clip_range[0]), float(self.reward_clip_range[1]))
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: RLOO needs >= 2 (leave-one-out baseline)")


class RLOOTrainer(OnlineTRLMixin, OnlineTrainer):
    """RLOO trainer: ``RLOOTrainer(model, reward_funcs, args, train_dataset, ..., reward_model=None)``.

    ``reward_model`` (a sequence-classification model, its path, or a `RewardModelScorer`) is the classic
    RLOO setup's reward; it is added to ``reward_funcs`` (which may then be omitted).
    """

    config_class: ClassVar = RLOOConfig
    requires_reward_funcs: ClassVar = True
    _tag_names: ClassVar = ["posttrain", "rloo"]

    def __init__(
        self,
        model: ModelArg,
        reward_funcs: Any = None,
        args: RLOOConfig | TrainingArguments | None = None,
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
        reward_model: Any = None,
        ref_model: ModelArg | None = None,
        engine: Any = None,
    ) -> None:
        if reward_model is not None:
            funcs = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])
            reward_funcs = funcs + [reward_model]
        super().__init__(model, reward_funcs, args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, reward_processing_classes=reward_processing_classes,
                         peft_config=peft_config, callbacks=callbacks, optimizers=optimizers, ref_model=ref_model,
                         engine=engine, quantization_config=quantization_config, tools=tools,
                         rollout_func=rollout_func, environment_factory=environment_factory)
        self._setup_online_trl()

    @property
    def zero_advantage_means_zero_gradient(self) -> bool:
        return self.args.beta == 0.0 or self.args.kl_in_reward  # the loss's KL term is off

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """Leave-one-out advantages of the rewards, minus ``beta *`` the sequence KL when it is in the reward."""
        args: RLOOConfig = self.args
        metrics: dict[str, float] = {}
        rewards = scored.rewards.total.to(batch.completion_mask.device)
        if args.reward_clip_range is not None:
            rewards = rewards.clamp(*args.reward_clip_range)
        if args.beta != 0.0 and args.kl_in_reward:
            # the sampled policy's log-probs: old ones if computed, else the current (identical) policy
            if batch.get("old_logps") is None:  # the policy at generation time; reused as old log-probs
                batch.old_logps = batched_completion_logps(self.model, batch.prompt_ids, batch.completion_ids,
                                                           batch_size=args.per_device_train_batch_size,
                                                           **self._logps_kwargs())
            kl = sequence_kl(batch.old_logps, batch.ref_logps, batch.completion_mask)
            # TRL's meaning of "kl": the mean per-token KL over the batch's completion tokens
            metrics["kl"] = float(kl.sum() / batch.completion_mask.sum().clamp(min=1))
            metrics["kl/sequence_mean"] = float(kl.mean())
            rewards = rewards - args.beta * kl
            metrics["reward_with_kl"] = float(rewards.mean())
        if scored.group_size < 2:  # an evaluation with num_generations_eval=1: no leave-one-out baseline
            return torch.zeros(len(scored)), metrics
        adv = rloo_advantages(rewards.cpu(), scored.group_size, valid=scored.rewards.valid)
        if args.normalize_advantages:
            adv = normalize_advantages(adv)
        return adv, metrics

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch,
                    mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        args: RLOOConfig = self.args
        beta = 0.0 if args.kl_in_reward else args.beta
        return rloo_loss(logps, batch.advantages, mask, old_logps=batch.get("old_logps"),
                         ref_logps=batch.get("ref_logps"), sampler_logps=batch.get("sampler_logps"), beta=beta, epsilon=args.epsilon,
                         epsilon_high=args.epsilon_high, is_cap=args.importance_sampling_cap,
                         is_mode=args.importance_sampling_mode, is_low=args.importance_sampling_low,
                         is_high=args.importance_sampling_high)


register_method(
    "rloo", RLOOConfig, RLOOTrainer,
    help="RLOO: REINFORCE with a leave-one-out baseline over num_generations completions per prompt.",
    extra_args=(RewardArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
