"""Contrastive Preference Optimization (CPO, Xu et al. 2024, arXiv:2401.08417) and SimPO (Meng et al. 2024,
arXiv:2405.14734): reference-free pairwise preference training, so only one model is ever held.

``loss = mean_i L(pair_i) + cpo_alpha * NLL(chosen)``; ``loss_type="simpo"`` uses length-averaged log-probs and
a target margin ``simpo_gamma`` (set ``cpo_alpha=0`` for pure SimPO). Formulas: :mod:`posttrain.losses.cpo`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..losses.cpo import CPO_LOSS_TYPES, cpo_loss
from ..losses.dpo import chosen_nll
from ._pref_base import PreferenceConfig, ReferenceFreeTrainerBase
from .registry import register_method

__all__ = ["CPOConfig", "CPOTrainer"]


@dataclass
class CPOConfig(PreferenceConfig):
    """Configuration of `CPOTrainer` (field names follow TRL's CPOConfig)."""

    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {', '.join(CPO_LOSS_TYPES)}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the sigmoid/simpo losses."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL on chosen responses (0: pure SimPO)."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})
    alpha: float = field(default=0.0, metadata={"help": "AlphaPO reward shape: s <- (1 - exp(-alpha s)) / alpha on "
                                                "each (length-averaged for simpo) log-prob; 0: the log-prob itself."})

    def __post_init__(self) -> None:
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}")
        super().__post_init__()


class CPOTrainer(ReferenceFreeTrainerBase):
    """CPO / SimPO on paired preference data; no reference model."""

    config_class: ClassVar = CPOConfig
    _tag_names: ClassVar = ["posttrain", "cpo"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: CPOConfig = self.args
        n = int(inputs["num_sequences"]) // 2
        out = self.policy_logps(model, inputs)
        losses, metrics = cpo_loss(
            out.logps[:n], out.logps[n:], beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
            chosen_lengths=out.lengths[:n], rejected_lengths=out.lengths[n:], alpha=args.alpha,
        )
        loss = self.row_mean(losses, num_items_in_batch)
        if args.cpo_alpha:
            loss = loss + args.cpo_alpha * self.chosen_token_nll(out, n, num_items_in_batch)
        metrics["nll_loss"] = chosen_nll(out.logps[:n], out.lengths[:n]).detach()
        metrics.update(self.pair_logp_metrics(out, n))
        return self.finish_loss(loss, metrics, return_outputs)


register_method(
    "cpo", CPOConfig, CPOTrainer,
    help="Contrastive Preference Optimization and SimPO (--loss_type simpo): reference-free pairwise training.",
    task_format="preference",
)
