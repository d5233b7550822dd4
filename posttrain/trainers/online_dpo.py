"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv:2402.04792).

Per prompt, ``num_generations`` completions are sampled from the current policy (the rollout engine: HF,
vLLM colocated or the rollout server); a judge or the reward functions pick the best and the worst (with
2 completions: the better and the worse; with more: best vs worst, where TRL samples exactly two), and the
pair trains the DPO (``sigmoid``) or IPO loss of `posttrain.losses.online_dpo_loss` against the reference
policy (``ref_model``, or the PEFT base with adapters disabled, or a frozen copy of the initial model).
Pairs the judge calls a tie (or equal rewards) are counted and left out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..losses.online_preference import online_dpo_loss
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online_config import RewardFuncArgs
from ._online_pref import JudgeArgs, OnlinePreferenceConfig, OnlinePreferenceTrainer, preference_trainer_kwargs
from .registry import register_method

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer"]


@dataclass
class OnlineDPOConfig(OnlinePreferenceConfig):
    """Configuration of `OnlineDPOTrainer` (TRL's field names and defaults; ``per_device_train_batch_size``
    counts sampled completions, ``num_generations`` per prompt)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: Online DPO needs >= 2 completions per prompt")


class OnlineDPOTrainer(OnlinePreferenceTrainer):
    """Online DPO: ``OnlineDPOTrainer(model, ref_model=None, reward_funcs=None, judge=None, args, train_dataset,
    eval_dataset, processing_class, reward_processing_classes, peft_config)``."""

    config_class: ClassVar = OnlineDPOConfig
    _tag_names: ClassVar = ["posttrain", "online-dpo"]

    def score(self, rows: list[dict], rollout, mode: str) -> ScoredRollout:
        """Rank each prompt's completions; keep its best (chosen, first) and worst (rejected)."""
        scored = super().score(rows, rollout, mode)
        best, worst, decided = self.best_and_worst(scored)
        picked = [j for pair in zip(best, worst) for j in pair]
        metrics = {"val/contain_eos_token": 1.0 - sum(rollout.truncated) / max(len(rollout.truncated), 1)}
        if scored.rewards is not None:
            total = self.scored_rewards(scored)
            metrics["objective/scores"] = float(total.nanmean())
            metrics["objective/scores_margin"] = float((total[best] - total[worst]).nanmean())
        weight = decided.repeat_interleave(2)
        chosen = torch.tensor([1.0, 0.0]).repeat(len(best))
        out = self.select_completions(scored, picked, {"chosen": chosen, "pair_weight": weight})
        out.metrics.update(metrics)
        out.metrics["objective/ties"] = float((decided == 0).sum())
        return out

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        """+1 for the chosen completion, -1 for the rejected one, 0 for both sides of a tie."""
        device = batch.completion_mask.device
        batch.chosen = scored.scores["chosen"].to(device)
        batch.pair_weight = scored.scores["pair_weight"].to(device)
        return (2 * batch.chosen - 1) * batch.pair_weight, {}

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        beta = self.coefficient("beta")
        ref = batch.ref_logps
        c, r = self.pairs_of(batch, batch.chosen)
        seq = (logps * mask).sum(-1)
        ref_seq = (ref * mask).sum(-1)
        losses, metrics = online_dpo_loss(seq[c], seq[r], ref_seq[c], ref_seq[r], beta=beta, loss_type=self.args.loss_type)
        weight = batch.pair_weight[c]
        loss = (losses * weight).sum() / weight.sum().clamp(min=1.0)
        metrics.update(self.sequence_metrics(logps, ref, mask))
        metrics["logps/chosen"] = seq[c].detach().mean()
        metrics["logps/rejected"] = seq[r].detach().mean()
        metrics["beta"] = beta
        return loss, {k: float(v) for k, v in metrics.items()}


register_method(
    "online_dpo", OnlineDPOConfig, OnlineDPOTrainer,
    help="Online DPO: pairs sampled from the policy, ranked by reward functions (best vs worst), DPO/IPO loss.",
    extra_args=(RewardFuncArgs, JudgeArgs), trainer_kwargs=preference_trainer_kwargs, task_format="prompt_only",
)
