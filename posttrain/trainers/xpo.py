"""XPO: Exploratory Preference Optimization (Xie et al. 2024, "Exploratory Preference Optimization:
Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF", arXiv:2405.21046).

Per prompt, one completion is sampled from the policy and one from the reference policy (the rollout
engine for the policy; `posttrain.online.engine_mixture.MixtureEngine` at ``mixture_coef=1`` for the
reference). A judge or the reward functions order them into (chosen, rejected); the loss
(`posttrain.losses.xpo_loss`) is the DPO / IPO loss of the pair plus ``alpha`` times the policy's
log-likelihood of the reference's completion, the exploration bonus (``alpha`` a float or one per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..losses.online_preference import xpo_loss
from ..online.pipeline import ScoredRollout
from ..online.rollout_batch import RolloutBatch
from ._online_config import RewardFuncArgs
from ._online_pref import (JudgeArgs, OnlinePreferenceConfig, OnlinePreferenceTrainer, _per_epoch,
                           preference_trainer_kwargs)
from .registry import register_method

__all__ = ["XPOConfig", "XPOTrainer"]


@dataclass
class XPOConfig(OnlinePreferenceConfig):
    """Configuration of `XPOTrainer` (TRL's fields: ``alpha`` and ``beta`` as floats or per-epoch lists)."""

    alpha: list[float] = field(default_factory=lambda: [1e-5], metadata={"help": (
        "Weight of the exploration bonus (the policy's log-likelihood of the reference's sample); one value or "
        "one per epoch.")})

    def __post_init__(self) -> None:
        self.alpha = _per_epoch("alpha", self.alpha)
        super().__post_init__()
        if self.num_generations != 2:
            raise ValueError(f"num_generations={self.num_generations}: XPO samples one policy and one reference "
                             "completion per prompt (num_generations=2)")


class XPOTrainer(OnlinePreferenceTrainer):
    """XPO: ``XPOTrainer(model, ref_model=None, reward_funcs=None, judge=None, args, train_dataset, ...)``."""

    config_class: ClassVar = XPOConfig
    _tag_names: ClassVar = ["posttrain", "xpo"]

    def rollout(self, rows: list[dict], mode: str, params=None):
        """Per prompt: the policy's completion, then the reference's."""
        return self.paired_rollout(rows, mode, params, mixture_coef=1.0)

    def score(self, rows: list[dict], rollout, mode: str) -> ScoredRollout:
        scored = super().score(rows, rollout, mode)
        n = len(rollout) // 2
        policy, ref = list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2))
        pref = self.pair_preference(scored, policy, ref)  # P(policy sample > reference sample)
        policy_wins = (pref > 0.5).float()
        scored.scores["from_policy"] = torch.tensor([1.0, 0.0]).repeat(n)
        scored.scores["chosen"] = torch.stack([policy_wins, 1 - policy_wins], 1).flatten()
        scored.scores["pair_weight"] = (pref != 0.5).float().repeat_interleave(2)
        truncated = torch.tensor(rollout.truncated, dtype=torch.float32)
        scored.metrics.update({
            "val/model_contain_eos_token": float(1 - truncated[policy].mean()),
            "val/ref_contain_eos_token": float(1 - truncated[ref].mean()),
            "rewards/win_rate": float((pref > 0.5).float().mean()),
            "objective/ties": float((pref == 0.5).sum()),
        })
        return scored

    def compute_advantages(self, scored: ScoredRollout, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        device = batch.completion_mask.device
        for name in ("from_policy", "chosen", "pair_weight"):
            setattr(batch, name, scored.scores[name].to(device))
        return (2 * batch.chosen - 1) * batch.pair_weight, {}

    def policy_loss(self, logps: torch.Tensor, batch: RolloutBatch, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        beta, alpha = self.coefficient("beta"), self.coefficient("alpha")
        seq, ref_seq = (logps * mask).sum(-1), (batch.ref_logps * mask).sum(-1)
        c, r = self.pairs_of(batch, batch.chosen)
        _, ref_rows = self.pairs_of(batch, batch.from_policy)
        # pairs_of lists groups in the same order for both flags, so ref_rows[p] belongs to pair p
        losses, metrics = xpo_loss(seq[c], seq[r], ref_seq[c], ref_seq[r], seq[ref_rows], beta=beta, alpha=alpha,
                                   loss_type=self.args.loss_type)
        weight = batch.pair_weight[c]
        loss = (losses * weight).sum() / weight.sum().clamp(min=1.0)
        policy_rows, _ = self.pairs_of(batch, batch.from_policy)
        metrics.update(self.sequence_metrics(logps[policy_rows], batch.ref_logps[policy_rows], mask[policy_rows]))
        metrics["logps/chosen"] = seq[c].detach().mean()
        metrics["logps/rejected"] = seq[r].detach().mean()
        metrics["beta"], metrics["alpha"] = beta, alpha
        return loss, {k: float(v) for k, v in metrics.items()}


register_method(
    "xpo", XPOConfig, XPOTrainer,
    help="XPO: online DPO on (policy, reference) sample pairs plus an exploration bonus alpha * log pi(y_ref).",
    extra_args=(RewardFuncArgs, JudgeArgs), trainer_kwargs=preference_trainer_kwargs, task_format="prompt_only",
)
