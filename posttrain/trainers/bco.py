"""Binary Classifier Optimization (BCO, Jung et al. 2024, arXiv:2404.04656) on thumbs-up/down data.

The implicit reward ``beta * (log pi - log pi_ref)`` is trained as the logit of a desirable/undesirable
classifier, shifted by ``delta``, a running mean of the rewards (kept in checkpoints). Paired data is unpaired
first. With ``embedding_func`` (or ``use_udm=True``, which embeds prompts with the model's input embeddings),
undesirable examples are re-weighted by the prompt density ratio (UDM, :mod:`posttrain.trainers._udm`).
Loss formulas: :mod:`posttrain.losses.bco`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import torch
from transformers import TrainingArguments

from ..data.streaming import is_stream
from ..losses.bco import RunningMean, bco_loss
from ._compat import (CallbacksArg, CollatorArg, DatasetArg, EvalDatasetArg, LogitsFn, MetricsFn, ModelArg, ModelInitArg,
                      OptimizerClsArg, OptimizersArg, PeftConfigArg, ProcessingClassArg, QuantizationArg)
from ._compat import model_from_init
from ._udm import EmbeddingFunc, mean_token_embedder, udm_weights
from ._unpaired import UnpairedConfig, UnpairedTrainerBase, unpaired_summary
from .registry import register_method

__all__ = ["BCOConfig", "BCOTrainer"]

RUNNING_NAME = "bco_running.json"


@dataclass
class BCOConfig(UnpairedConfig):
    """Configuration of `BCOTrainer` (field names follow TRL's BCOConfig)."""

    learning_rate: float = field(default=5e-7, metadata={"help": "Peak learning rate of AdamW (TRL's default)."})
    use_udm: bool = field(default=False, metadata={"help": "Re-weight undesirable examples by the prompt density "
                                                   "ratio (UDM); on by default when an embedding_func is given."})
    prompt_sample_size: int = field(default=1024, metadata={"help": "Prompts per class to fit the UDM classifier."})
    min_density_ratio: float = field(default=0.5, metadata={"help": "Lower clamp of the UDM weight."})
    max_density_ratio: float = field(default=10.0, metadata={"help": "Upper clamp of the UDM weight."})


class BCOTrainer(UnpairedTrainerBase):
    """BCO on unpaired (or unpaired-from-paired) preference data. TRL-shaped constructor, plus
    ``embedding_func(texts) -> Tensor [N, D]`` for UDM."""

    config_class: ClassVar = BCOConfig
    _tag_names: ClassVar = ["posttrain", "bco"]

    def __init__(
        self,
        model: ModelArg = None,
        ref_model: ModelArg | None = None,
        args: BCOConfig | TrainingArguments | None = None,
        train_dataset: DatasetArg = None,
        eval_dataset: EvalDatasetArg = None,
        processing_class: ProcessingClassArg = None,
        data_collator: CollatorArg = None,
        model_init: ModelInitArg = None,
        callbacks: CallbacksArg = None,
        optimizers: OptimizersArg = (None, None),
        preprocess_logits_for_metrics: LogitsFn = None,
        peft_config: PeftConfigArg = None,
        compute_metrics: MetricsFn = None,
        model_adapter_name: str | None = None,
        ref_adapter_name: str | None = None,
        embedding_func: EmbeddingFunc | None = None,
        embedding_tokenizer: ProcessingClassArg = None,
    ) -> None:
        if model_adapter_name is not None or ref_adapter_name is not None:
            raise ValueError("model_adapter_name / ref_adapter_name (a PEFT model with a second, reference adapter) "
                             "are not supported: the reference of a PEFT policy is its base with adapters disabled")
        model = model_from_init(model, model_init)
        super(
            ).__init__(model, ref_model, args=args or BCOConfig(), train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, data_collator=data_collator,
            callbacks=callbacks, optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics, peft_config=peft_config,
            compute_metrics=compute_metrics)
        self.setup_sync_ref_model()
        self.embedding_tokenizer = embedding_tokenizer  # what embedding_func tokenizes with (the caller's choice)
        self.running = RunningMean()
        if embedding_func is not None or self.args.use_udm:
            embed = embedding_func or mean_token_embedder(self.model, self.tokenizer)
            self.train_dataset = self._add_udm_weights(self.train_dataset, embed)

    def _add_udm_weights(self, dataset: datasets.Dataset | None, embed: EmbeddingFunc) -> datasets.Dataset | None:
        if dataset is None:
            return None
        if is_stream(dataset):
            raise ValueError("UDM weights (use_udm, embedding_func) are fit on the whole train set's prompts; a "
                             "streamed dataset (IterableDataset) is read as it trains: drop UDM or load the dataset")
        args: BCOConfig = self.args
        prompts = [self.tokenizer.decode(list(ids)) for ids in dataset["prompt_ids"]]
        weights = udm_weights(prompts, [bool(x) for x in dataset["label"]], embed, sample_size=args.prompt_sample_size,
                              min_ratio=args.min_density_ratio, max_ratio=args.max_density_ratio, seed=args.seed)
        if "udm_weight" in dataset.column_names:
            dataset = dataset.remove_columns("udm_weight")
        return dataset.add_column("udm_weight", weights)

    def _batch_delta(self, rewards: torch.Tensor, training: bool) -> float:
        """Update the running reward mean with this batch's mean (all processes) when training; return delta."""
        if not training:
            return self.running.mean
        mean = rewards.detach().float().mean().reshape(1)
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.gather(mean)
        return self.running.update(mean)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: BCOConfig = self.args
        out = self.policy_logps(model, inputs)
        ref = self.reference_logps(inputs).to(out.logps.device)
        delta = self._batch_delta(args.beta * (out.logps - ref), model.training)
        losses, metrics = bco_loss(out.logps, ref, inputs["label"], beta=args.beta, delta=delta,
                                   udm_weights=inputs.get("udm_weight"), desirable_weight=args.desirable_weight,
                                   undesirable_weight=args.undesirable_weight)
        loss = self.row_mean(losses, num_items_in_batch)
        return self.finish_loss(loss, unpaired_summary(metrics), return_outputs)

    # The running reward mean is part of the training state: saved and restored with checkpoints.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.is_world_process_zero():
            with open(os.path.join(output_dir, RUNNING_NAME), "w") as f:
                json.dump(self.running.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, RUNNING_NAME)):
            with open(os.path.join(checkpoint, RUNNING_NAME)) as f:
                self.running.load_state_dict(json.load(f))


register_method(
    "bco", BCOConfig, BCOTrainer,
    help="Binary Classifier Optimization on thumbs-up/down data (paired data is unpaired); optional UDM.",
    task_format="unpaired_preference",
)
