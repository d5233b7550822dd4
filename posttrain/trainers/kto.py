"""Kahneman-Tversky Optimization (KTO, Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired data.

Each row is a prompt, a completion and a desirable/undesirable label (paired data is unpaired first). The
reference point ``z_0`` is estimated on mismatched prompt/completion pairs (each prompt with another row's
completion), without gradient. Loss formulas: :mod:`posttrain.losses.kto`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ..losses.kto import KTO_LOSS_TYPES, kto_loss
from ._compat import (CallbacksArg, CollatorArg, DatasetArg, EvalDatasetArg, LogitsFn, MetricsFn, ModelArg, ModelInitArg,
                      OptimizerClsArg, OptimizersArg, PeftConfigArg, ProcessingClassArg, QuantizationArg)
from ._preference import sequence_logps
from ._unpaired import UnpairedConfig, UnpairedTrainerBase, unpaired_summary
from .registry import register_method

__all__ = ["KTOConfig", "KTOTrainer"]


@dataclass
class KTOConfig(UnpairedConfig):
    """Configuration of `KTOTrainer` (field names follow TRL's KTOConfig)."""

    loss_type: str = field(default="kto", metadata={"help": f"One of {', '.join(KTO_LOSS_TYPES)}."})

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {', '.join(KTO_LOSS_TYPES)}")
        super().__post_init__()


class KTOTrainer(UnpairedTrainerBase):
    """KTO on unpaired (or unpaired-from-paired) preference data. TRL-shaped constructor, with ``ref_model``."""

    config_class: ClassVar = KTOConfig
    _tag_names: ClassVar = ["posttrain", "kto"]
    needs_kl: ClassVar[bool] = True
    ref_columns: ClassVar[tuple[str, ...]] = ("ref_logps", "ref_kl_logps")

    def __init__(
        self,
        model: ModelArg,
        ref_model: ModelArg | None = None,
        args: KTOConfig | TrainingArguments | None = None,
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
        super().__init__(
            model, ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config)
        self.setup_sync_ref_model()

    def reference_forward_all(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.cat([self.reference_forward(batch), self.reference_forward(batch["kl_batch"])])

    def _kl_estimate(self, model, inputs, ref_kl: torch.Tensor) -> torch.Tensor:
        """``z_0 = max(0, mean over all processes of log pi(y'|x) - log pi_ref(y'|x))``, no gradient."""
        with torch.no_grad():
            kl_logps = sequence_logps(model, inputs["kl_batch"], chunk_size=self.args.logits_chunk_size).logps
            diff = (kl_logps - ref_kl.to(kl_logps.device)).float()
            stats = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])
            stats = self.accelerator.reduce(stats, reduction="sum") if self.accelerator.num_processes > 1 else stats
            return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: KTOConfig = self.args
        out = self.policy_logps(model, inputs)
        n = out.logps.shape[0]
        ref = self.reference_logps(inputs).to(out.logps.device)
        ref_logps, ref_kl = ref[:n], ref[n:]
        kl = self._kl_estimate(model, inputs, ref_kl) if args.loss_type == "kto" else torch.zeros(())
        losses, metrics = kto_loss(
            out.logps, ref_logps, inputs["label"], kl=kl, beta=args.beta, desirable_weight=args.desirable_weight,
            undesirable_weight=args.undesirable_weight, loss_type=args.loss_type,
        )
        loss = self.row_mean(losses, num_items_in_batch)
        return self.finish_loss(loss, unpaired_summary(metrics), return_outputs)


register_method(
    "kto", KTOConfig, KTOTrainer,
    help="Kahneman-Tversky Optimization on unpaired desirable/undesirable completions (paired data is unpaired).",
    task_format="unpaired_preference",
)
