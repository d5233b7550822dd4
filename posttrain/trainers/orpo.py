"""Odds Ratio Preference Optimization (ORPO, Hong et al. 2024, arXiv:2403.07691): SFT on the chosen responses
plus an odds-ratio penalty on the rejected ones, in one stage and without a reference model.

``loss = NLL(chosen) + beta * mean_i -log sigma(log odds(y_w) - log odds(y_l))`` (``beta`` is the paper's
lambda); formula in :mod:`posttrain.losses.orpo`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..losses.dpo import chosen_nll
from ..losses.orpo import orpo_loss
from ._pref_base import PreferenceConfig, ReferenceFreeTrainerBase
from .registry import register_method

__all__ = ["ORPOConfig", "ORPOTrainer"]


@dataclass
class ORPOConfig(PreferenceConfig):
    """Configuration of `ORPOTrainer` (field names follow TRL's ORPOConfig)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW."})


class ORPOTrainer(ReferenceFreeTrainerBase):
    """ORPO on paired preference data; no reference model."""

    config_class: ClassVar = ORPOConfig
    _tag_names: ClassVar = ["posttrain", "orpo"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: ORPOConfig = self.args
        n = int(inputs["num_sequences"]) // 2
        out = self.policy_logps(model, inputs)
        losses, metrics = orpo_loss(out.logps[:n], out.logps[n:], out.lengths[:n], out.lengths[n:], beta=args.beta)
        loss = self.chosen_token_nll(out, n, num_items_in_batch) + self.row_mean(losses, num_items_in_batch)
        metrics["nll_loss"] = chosen_nll(out.logps[:n], out.lengths[:n]).detach()
        metrics.update(self.pair_logp_metrics(out, n))
        return self.finish_loss(loss, metrics, return_outputs)


register_method(
    "orpo", ORPOConfig, ORPOTrainer,
    help="Odds Ratio Preference Optimization: SFT on chosen plus an odds-ratio penalty, no reference model.",
    task_format="preference",
)
