"""Nash-MD: Nash Mirror Descent (Munos et al. 2023, "Nash Learning from Human Feedback", arXiv:2312.00886).

Per prompt, one completion ``y`` is sampled from the policy (the rollout engine) and one ``y'`` from the
geometric mixture ``pi^(1-m) ref^m`` of policy and reference (`posttrain.online.engine_mixture.MixtureEngine`,
``m = mixture_coef``, a float or one per epoch; always sampled on the training model, also when the policy
samples on vLLM). The preference ``P(y > y')`` comes from a judge (1, 0, or 0.5 for a tie) or from the
reward functions (``sigma(r(y) - r(y'))``); the policy trains on ``y`` with the Nash-MD loss of
`posttrain.losses.nash_md_loss`: the preference's policy gradient (baseline 1/2) plus ``beta`` times the
score-function gradient of ``KL(pi || ref)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..losses.online_preference import nash_md_loss
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online_config import RewardFuncArgs
from ._online_pref import (JudgeArgs, OnlinePreferenceConfig, OnlinePreferenceTrainer, _per_epoch,
                           preference_trainer_kwargs)
from .registry import register_method

__all__ = ["NashMDConfig", "NashMDTrainer"]


@dataclass
class NashMDConfig(OnlinePreferenceConfig):
    """Configuration of `NashMDTrainer` (TRL's fields; ``mixture_coef`` a float or a per-epoch list)."""

    mixture_coef: list[float] = field(default_factory=lambda: [0.5], metadata={"help": (
        "m of the geometric mixture pi^(1-m) ref^m the opponent's completions are sampled from (0: the policy, "
        "1: the reference); one value or one per epoch.")})

    def __post_init__(self) -> None:
        self.mixture_coef = _per_epoch("mixture_coef", self.mixture_coef, 0.0, 1.0)
        super().__post_init__()
        if self.num_generations != 2:
            raise ValueError(f"num_generations={self.num_generations}: Nash-MD samples one policy and one mixture "
                             "completion per prompt (num_generations=2)")
        if self.loss_type != "sigmoid":
            raise ValueError("Nash-MD has one loss (loss_type='sigmoid', the default); 'ipo' is for Online DPO / XPO")


class NashMDTrainer(OnlinePreferenceTrainer):
    """Nash-MD: ``NashMDTrainer(model, ref_model=None, reward_funcs=None, judge=None, args, train_dataset, ...)``."""

    config_class: ClassVar = NashMDConfig
    _tag_names: ClassVar = ["posttrain", "nash-md"]

    def rollout(self, rows: list[dict], mode: str, params=None):
        """Per prompt: the policy's completion, then the mixture's."""
        return self.paired_rollout(rows, mode, params, mixture_coef=self.coefficient("mixture_coef"))

    def informative_groups(self, scored: ScoredRollout) -> torch.Tensor:
        return scored.scores["probability"] != 0.5

    def score(self, rows: list[dict], rollout, mode: str) -> ScoredRollout:
        """The preference of each policy completion over its mixture opponent; only the policy's completions
        go on to training."""
        scored = super().score(rows, rollout, mode)
        n = len(rollout) // 2
        policy, mixture = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
        probability = self.pair_preference(scored, policy, mixture)
        truncated = torch.tensor(rollout.truncated, dtype=torch.float32)
        out = self.select_completions(scored, policy, {"probability": probability})
        out.metrics.update({
            "val/model_contain_eos_token": float(1 - truncated[policy].mean()),
            "val/ref_contain_eos_token": float(1 - truncated[mixture].mean()),
            "mixture_coef": self.coefficient("mixture_coef"),
        })
        return out

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """The preference minus its baseline 1/2 (what multiplies ``grad log pi(y)`` in the loss)."""
        batch.probability = scored.scores["probability"].to(batch.completion_mask.device)
        return batch.probability - 0.5, {}

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        beta = self.coefficient("beta")
        losses, metrics = nash_md_loss(logps, batch.ref_logps, mask, batch.probability, beta=beta)
        metrics.update(self.sequence_metrics(logps, batch.ref_logps, mask))
        metrics["beta"] = beta
        metrics["mixture_coef"] = self.coefficient("mixture_coef")
        return losses.mean(), {k: float(v) for k, v in metrics.items()}


register_method(
    "nash_md", NashMDConfig, NashMDTrainer,
    help="Nash-MD: policy samples against samples of the policy/reference geometric mixture, judged or rewarded.",
    extra_args=(RewardFuncArgs, JudgeArgs), trainer_kwargs=preference_trainer_kwargs, task_format="prompt_only",
)
