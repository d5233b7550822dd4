"""Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) and its loss variants.

One forward per batch holds every chosen and rejected sequence (packed, padding-free by default); log-probs
come from hidden states through the chunked ops, so no ``[batch, length, vocab]`` logits are ever held. The
reference is the PEFT base with adapters disabled, a frozen copy of the initial policy, a given
``ref_model``, or log-probs precomputed once per example (``precompute_ref_log_probs``). Loss formulas live
in :mod:`posttrain.losses.dpo`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ..losses.bco import RunningMean
from ..losses.dpo import (DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, chosen_nll, dpo_loss, wpo_weights,
                          ld_pair_logps)
from ._compat import (CallbacksArg, CollatorArg, DatasetArg, EvalDatasetArg, LogitsFn, MetricsFn, ModelArg, ModelInitArg,
                      OptimizerClsArg, OptimizersArg, PeftConfigArg, ProcessingClassArg, QuantizationArg)
from ._pref_base import PreferenceTrainerBase, ReferenceConfig
from ._preference import SequenceLogps, sequence_logps
from .registry import register_method

__all__ = ["DPOConfig", "DPOTrainer"]


@dataclass
class DPOConfig(ReferenceConfig):
    """Configuration of `DPOTrainer` (field names follow TRL's DPOConfig)."""

    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"DPO loss, or several mixed with loss_weights (MPO): {', '.join(DPO_LOSS_TYPES)}."})
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each loss_type in a mix (default 1 each)."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Probability that a preference label is flipped (cDPO, robust, EXO, AOT)."})
    reference_free: bool = field(default=False, metadata={"help": "Use a uniform reference (no reference model)."})
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Weight of the NLL on chosen responses added to the loss (RPO)."})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO: weight of the log-probs of the tokens past the shorter "
                                "response of each pair (1 = plain DPO)."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of the discopop loss."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": (
        f"f-DPO divergence: {', '.join(F_DIVERGENCES)} (reverse_kl is DPO).")})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of the alpha_divergence."})
    use_weighting: bool = field(default=False, metadata={"help": (
        "WPO: weight each pair's loss by the policy's length-normalized probabilities of its two responses "
        "relative to its own sampling (losses/dpo.py wpo_weights); one extra no-grad pass of the output head.")})

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [t.strip() for t in self.loss_type.split(",")]
        for name in self.loss_type:
            if name not in DPO_LOSS_TYPES:
                raise ValueError(f"unknown loss_type {name!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for loss_type {self.loss_type}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r}: expected one of {', '.join(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_type) <= set(F_DIVERGENCE_LOSS_TYPES):
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} applies to the loss types "
                             f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}; got {self.loss_type}")
        if self.use_weighting and any(t.startswith("aot") for t in self.loss_type):
            raise ValueError("use_weighting (WPO) does not apply to the aot losses, which sort the batch's pairs")
        if self.sync_ref_model and self.reference_free:
            raise ValueError("sync_ref_model and reference_free exclude each other")
        super().__post_init__()


class DPOTrainer(PreferenceTrainerBase):
    """DPO and its variants on paired preference data (explicit or implicit prompt, plain or conversational).

    TRL-shaped: ``DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=..., eval_dataset=...,
    processing_class=..., peft_config=...)``.
    """

    config_class: ClassVar = DPOConfig
    uses_reference: ClassVar[bool] = True
    _tag_names: ClassVar = ["posttrain", "dpo"]

    def __init__(
        self,
        model: ModelArg,
        ref_model: ModelArg | None = None,
        args: DPOConfig | TrainingArguments | None = None,
        data_collator: CollatorArg = None,
        train_dataset: DatasetArg = None,
        eval_dataset: EvalDatasetArg = None,
        processing_class: ProcessingClassArg = None,
        compute_metrics: MetricsFn = None,
        callbacks: CallbacksArg = None,
        optimizers: OptimizersArg = (None, None),
        quantization_config: QuantizationArg = None,
        peft_config: PeftConfigArg = None,
    ) -> None:
        args = self.resolve_args(args)
        super().__init__(
            model, ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config)
        self.bco_running = RunningMean()
        self.setup_sync_ref_model()

    def sequence_scores(self, out: SequenceLogps) -> torch.Tensor:
        """Summed log-probs, or with ``ld_alpha`` the LD-DPO ones (for the policy and the reference alike)."""
        if self.args.ld_alpha is None:
            return out.logps
        n = out.logps.shape[0] // 2
        chosen, rejected = ld_pair_logps(out.token_logps[:n], out.token_mask[:n], out.token_logps[n:],
                                         out.token_mask[n:], self.args.ld_alpha)
        return torch.cat([chosen, rejected])

    def policy_logps(self, model: torch.nn.Module, inputs: dict[str, Any]) -> SequenceLogps:
        if not self.args.use_weighting:
            return super().policy_logps(model, inputs)
        return sequence_logps(model, inputs, chunk_size=self.args.logits_chunk_size, with_logits_mean=True,
                              with_log_sum_sq=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: DPOConfig = self.args
        n = int(inputs["num_sequences"]) // 2
        out = self.policy_logps(model, inputs)
        scores = self.sequence_scores(out)
        chosen, rejected = scores[:n], scores[n:]
        if args.reference_free:
            ref_c = ref_r = None
        else:
            ref = self.reference_logps(inputs).to(chosen.device)
            ref_c, ref_r = ref[:n], ref[n:]
        delta = 0.0
        if "bco_pair" in args.loss_type and ref_c is not None:
            rewards = args.beta * torch.cat([chosen - ref_c, rejected - ref_r]).detach().mean()
            delta = self.bco_running.update(rewards) if model.training else self.bco_running.mean
        losses, metrics = dpo_loss(
            chosen, rejected, ref_c, ref_r, beta=args.beta, loss_type=args.loss_type,
            loss_weights=args.loss_weights, label_smoothing=args.label_smoothing,
            reference_free=args.reference_free, chosen_lengths=out.lengths[:n], rejected_lengths=out.lengths[n:],
            bco_delta=delta, discopop_tau=args.discopop_tau, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        )
        if args.use_weighting:  # WPO: each pair's loss times w(chosen) * w(rejected)
            weights = wpo_weights(out.token_logps, out.token_log_sum_sq, out.token_mask)
            losses = losses * weights[:n] * weights[n:]
            metrics["wpo/weight_mean"] = (weights[:n] * weights[n:]).mean()
        loss = self.row_mean(losses, num_items_in_batch)
        if args.rpo_alpha is not None:
            loss = loss + args.rpo_alpha * self.chosen_token_nll(out, n, num_items_in_batch)
            metrics["nll_loss"] = chosen_nll(out.logps[:n], out.lengths[:n]).detach()
        metrics.update(self.pair_logp_metrics(out, n))
        return self.finish_loss(loss, metrics, return_outputs)


register_method(
    "dpo", DPOConfig, DPOTrainer,
    help="Direct Preference Optimization on chosen/rejected pairs (many loss variants via --loss_type).",
    task_format="preference",
)
