"""Base config and trainer of the offline preference methods (DPO, CPO, ORPO, KTO, BCO).

What lives here: paired-row tokenization (explicit or implicit prompt, plain or conversational), the packed
chosen+rejected collator, the reference policy (separate model, PEFT base with adapters disabled, or
precomputed once per example and cached), and the shared metrics. Each method's module adds its config
fields and its ``compute_loss``.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import datasets
import torch
from transformers import TrainingArguments

from ..data.streaming import is_stream
from ..data import DatasetKind, FormatInfo, split_implicit_prompt, validate_dataset
from ..models import is_peft_model, load_model
from ..ops.attention import use_varlen_attention
from ..ops.forward import prediction_mask
from ._compat import (CallbacksArg, CollatorArg, DatasetArg, EvalDatasetArg, LogitsFn, MetricsFn, ModelArg, ModelInitArg,
                      OptimizerClsArg, OptimizersArg, PeftConfigArg, ProcessingClassArg, QuantizationArg)
from ._loss_items import LossItemsMixin
from ..losses.dpo import chosen_nll
from ._preference import SequenceCollator, SequenceLogps, sequence_logps, tokenize_completions
from ._reference import (
    check_distinct_reference, dataset_content_hash, model_fingerprint, precompute_columns, reference_context,
    resolve_reference,
)
from ._reference import SyncRefModelCallback
from ._trl_fields import PAD_TO_MULTIPLE_HELP, resolve_pad_to_multiple_of
from .base import PostTrainConfig, PostTrainer

logger = logging.getLogger(__name__)

PAIR_FIELDS = (("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids"))


@dataclass
class PreferenceConfig(PostTrainConfig):
    """Fields shared by the offline preference methods (names follow TRL's configs)."""

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the implicit KL / reward scale."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Keep only the last N prompt tokens (None: no limit besides max_length)."})
    padding_free: bool = field(
        default=True,
        metadata={"help": "Pack all sequences of a batch (chosen and rejected) into as few rows as possible, "
                  "with per-sequence position ids: no compute on padding, no attention across sequences."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": PAD_TO_MULTIPLE_HELP})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Keep only the first N tokens of each completion (None: no limit besides "
                                "max_length)."})
    truncation_mode: str = field(
        default="keep_start", metadata={"help": "When prompt + completion exceed max_length: 'keep_start' cuts the "
                                        "completion's end (the prompt keeps its last tokens only if it alone is too "
                                        "long); 'keep_end' (deprecated in TRL) cuts the prompt's start first."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability of the policy "
                                                          "(and a reference model) to 0."})
    padding_value: int | None = field(default=None, metadata={"help": "Token id to pad rows with (default: the "
                                                              "tokenizer's pad token)."})
    generate_during_eval: bool = field(default=False, metadata={"help": (
        "Sample completions at evaluation and log them (TRL, to W&B/Comet). Not supported here: warned when set.")})
    is_encoder_decoder: bool | None = field(default=None, metadata={"help": (
        "Whether the model is an encoder-decoder (None: from the model). posttrain trains decoder-only models; "
        "True is an error.")})

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode={self.truncation_mode!r}: expected 'keep_start' or 'keep_end'")
        if self.is_encoder_decoder:
            raise ValueError("is_encoder_decoder=True: posttrain's preference trainers train decoder-only models")
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)
        super().__post_init__()


@dataclass
class ReferenceConfig(PreferenceConfig):
    """Preference methods with a reference policy (DPO, KTO, BCO)."""

    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Run the reference once per example before training, cache the log-probs with the "
                  "dataset (reused by later epochs and re-runs) and free the reference model."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the precompute pass (default: the eval batch size)."})
    ref_logps_cache_dir: str | None = field(
        default=None, metadata={"help": "Where precomputed reference log-probs are cached "
                                "(default: $HF_DATASETS_CACHE/posttrain_ref_logps)."})
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: move the reference toward the policy during training."})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO mixing weight of the policy."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: update the reference every N steps."})

    def __post_init__(self) -> None:
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError("sync_ref_model needs a live reference model; it cannot be combined with "
                             "precompute_ref_log_probs")
        super().__post_init__()


class PreferenceTrainerBase(LossItemsMixin, PostTrainer):
    """Shared machinery; subclasses set ``uses_reference`` and ``ref_columns`` and write ``compute_loss``.

    Losses are sums over the batch's rows (pairs, or unpaired rows) divided by the optimizer step's row count,
    and NLL terms sums over chosen tokens divided by the step's chosen-token count (``count_loss_items``), so
    gradient accumulation does not change them.
    """

    accepted_formats: ClassVar[Sequence[DatasetKind]] = (DatasetKind.PREFERENCE,)
    uses_reference: ClassVar[bool] = False
    # precomputed reference columns and the collator field pairs they follow, column-major
    ref_columns: ClassVar[tuple[str, ...]] = ("ref_chosen_logps", "ref_rejected_logps")
    seq_fields: ClassVar[tuple[tuple[str, str], ...]] = PAIR_FIELDS
    token_columns: ClassVar[tuple[str, ...]] = ("prompt_ids", "chosen_ids", "rejected_ids")

    def __init__(self, model: Any, ref_model: Any = None, args: PostTrainConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, peft_config: Any = None, **kwargs: Any) -> None:
        if self.uses_reference:
            check_distinct_reference(model, ref_model)  # before any data is tokenized
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        self.ref_model = None
        if self.uses_reference and not self._reference_free():
            self._setup_reference(ref_model)
        elif ref_model is not None:
            logger.warning("%s does not use a reference model; ref_model is ignored", type(self).__name__)

    # ------------------------------------------------------------------------------------------ data
    def prepare_dataset(self, dataset: Any, name: str) -> datasets.Dataset:
        # Python rows are checked before Arrow conversion, which would fail on a mistyped row without
        # saying which row and field.
        if isinstance(dataset, (list, tuple, dict)) and not isinstance(dataset, datasets.DatasetDict):
            validate_dataset(dataset, self.accepted_formats)
        tokenized = super().prepare_dataset(dataset, name)
        if is_stream(tokenized):
            return tokenized
        return self.drop_rows_without_loss(tokenized, name, self._rows_with_loss(tokenized),
                                           "no completion token has a prediction: an empty prompt before a "
                                           "one-token completion")

    def _row_has_loss(self, row: dict) -> bool:
        """Some completion has a token with a prediction (the first token of a sequence has none)."""
        prompt = len(row["prompt_ids"])
        return any(len(row[c]) > (0 if prompt else 1) for c in dict.fromkeys(c for _, c in self.seq_fields))

    def _rows_with_loss(self, tokenized: datasets.Dataset) -> list[bool]:
        columns = ["prompt_ids", *dict.fromkeys(c for _, c in self.seq_fields)]
        return [self._row_has_loss(row) for row in tokenized.select_columns(columns).with_format("arrow")[:].to_pylist()]

    def preprocess_dataset(self, dataset: datasets.Dataset, info: FormatInfo) -> datasets.Dataset:
        if info.kind is DatasetKind.PREFERENCE and info.implicit_prompt:
            dataset = dataset.map(split_implicit_prompt, desc="split implicit prompts")
        return dataset

    def stream_options(self, info: FormatInfo, name: str) -> dict[str, Any]:
        if getattr(self.args, "precompute_ref_log_probs", False):
            raise ValueError(f"{name}: precompute_ref_log_probs=True needs the whole dataset ahead of training; a "
                             "streamed dataset (IterableDataset) is read as it trains: set it to False")
        split = info.kind is DatasetKind.PREFERENCE and info.implicit_prompt
        return {"expand": (lambda row: [split_implicit_prompt(row)]) if split else None, "keep": self._row_has_loss}

    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        prompt_ids, (chosen, rejected), truncated = tokenize_completions(
            self.tokenizer, row["prompt"], [row["chosen"], row["rejected"]], **self.truncation_kwargs(),
            tools=row.get("tools"))
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}

    def truncation_kwargs(self) -> dict[str, Any]:
        args = self.args
        return {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                "max_completion_length": args.max_completion_length, "truncation_mode": args.truncation_mode}

    @property
    def pad_id(self) -> int:
        value = getattr(self.args, "padding_value", None)
        return self.tokenizer.pad_token_id if value is None else value

    inapplicable_fields: ClassVar[dict[str, str]] = {
        **PostTrainer.inapplicable_fields,
        "generate_during_eval": "evaluation logs the loss and the method's metrics; it does not sample completions",
    }

    def setup_sync_ref_model(self) -> None:
        """TR-DPO's reference sync (``sync_ref_model``), for the methods with a reference (DPO, KTO, BCO)."""
        args = self.args
        if not getattr(args, "sync_ref_model", False):
            return
        if self.ref_model is None:
            raise ValueError("sync_ref_model needs a separate reference model; with a PEFT model the "
                             "reference is the frozen base and cannot be synced")
        if is_peft_model(self.model):  # the soft update matches parameters by name
            raise ValueError("sync_ref_model with a PEFT policy and a ref_model is not supported: the "
                             "policy's weights are a base plus adapters, named unlike the reference's, so "
                             "nothing would be mixed in. Train without PEFT, or drop sync_ref_model")
        self.add_callback(SyncRefModelCallback(self.ref_model, args.ref_model_mixup_alpha, args.ref_model_sync_steps))

    def make_collator(self) -> SequenceCollator:
        return SequenceCollator(self.pad_id, self.seq_fields, padding_free=self.args.padding_free,
                                passthrough=self.ref_columns + ("label", "udm_weight"),
                                pad_to_multiple_of=self.args.pad_to_multiple_of)

    # ------------------------------------------------------------------------------------- reference
    def _reference_free(self) -> bool:
        return bool(getattr(self.args, "reference_free", False))

    def _setup_reference(self, ref_model: Any) -> None:
        args = self.args
        precompute = bool(getattr(args, "precompute_ref_log_probs", False))
        ref_model = resolve_reference(  # a given ref_model is used, PEFT or not (TRL does the same)
            self.model, ref_model, load=lambda name: load_model(name, **dict(args.model_init_kwargs or {})),
            copy_policy=not precompute)
        if ref_model is not None:
            if args.padding_free:
                use_varlen_attention(ref_model)  # as the base class did for the policy
            ref_model.eval().requires_grad_(False)
            ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.ref_model = ref_model
        if precompute:
            self._precompute_reference()
            self.ref_model = None  # the cached columns replace it
            del ref_model
            gc.collect()

    def reference_forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sequence reference log-probs ``[S]`` of a collated batch (the only reference forward)."""
        with reference_context(self.model, self.ref_model) as ref:
            return self.sequence_scores(sequence_logps(ref, batch, chunk_size=self.args.logits_chunk_size))

    def sequence_scores(self, out: SequenceLogps) -> torch.Tensor:
        """The per-sequence log-probs ``[S]`` the loss uses, the same for policy and reference (default: sums;
        DPO's ``ld_alpha`` re-weights the tails)."""
        return out.logps

    def reference_forward_all(self, batch: dict[str, Any]) -> torch.Tensor:
        """Every reference value a batch needs, in ``ref_columns`` order (column-major), ``[len(ref_columns) * B]``."""
        return self.reference_forward(batch)

    def reference_logps(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Reference log-probs: the precomputed columns when present, else reference forwards."""
        if all(c in inputs for c in self.ref_columns):
            return torch.cat([inputs[c].float() for c in self.ref_columns])
        if getattr(self.args, "precompute_ref_log_probs", False):
            raise RuntimeError("precompute_ref_log_probs=True but the batch has no reference columns")
        return self.reference_forward_all(inputs)

    def _precompute_reference(self) -> None:
        args = self.args
        collate = self.make_collator()
        ref_module = self.ref_model if self.ref_model is not None else self.model

        def compute(batch: dict) -> torch.Tensor:
            batch = self._prepare_input(batch)
            for c in self.ref_columns:
                batch.pop(c, None)
            return self.reference_forward_all(batch)

        key_base = {"method": type(self).__name__, "ref": model_fingerprint(ref_module, exclude_adapters=True),
                    "columns": list(self.ref_columns), "max_length": args.max_length,
                    "max_prompt_length": args.max_prompt_length, "ld_alpha": getattr(args, "ld_alpha", None)}
        batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
        show = not args.disable_tqdm and self.is_world_process_zero()
        was_training = self.model.training
        self.model.eval()
        try:
            if self.train_dataset is not None:
                self.train_dataset = self._precompute_dataset(self.train_dataset, "train", compute, collate,
                                                              key_base, batch_size, show)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute_dataset(v, f"eval/{k}", compute, collate, key_base,
                                                                 batch_size, show)
                                     for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_dataset(self.eval_dataset, "eval", compute, collate,
                                                             key_base, batch_size, show)
        finally:
            self.model.train(was_training)

    def _precompute_dataset(self, dataset, name, compute, collate, key_base, batch_size, show):
        columns = [c for c in self.token_columns if c in dataset.column_names]
        key = {**key_base, "data": dataset_content_hash(dataset, columns)}
        return precompute_columns(
            dataset, columns=self.ref_columns, collate=collate, compute=compute, batch_size=batch_size,
            cache_key=key, cache_dir=getattr(self.args, "ref_logps_cache_dir", None),
            description=f"reference log-probs ({name})", show_progress=show)

    # ------------------------------------------------------------------------------------------ loss
    @property
    def sequences_per_row(self) -> int:
        """Sequences a dataset row adds to a batch: 2 for pairs (chosen, rejected), 1 for unpaired rows."""
        return len(self.seq_fields)

    def count_loss_items(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``rows``: pairs (or unpaired rows), what the preference losses average over; ``chosen_tokens``:
        completion tokens with a prediction in the first sequence group (the chosen responses), what the NLL
        terms (RPO, CPO, ORPO) average over."""
        rows = int(batch["num_sequences"]) // self.sequences_per_row
        scored = prediction_mask(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                 batch["completion_mask"])
        seq = batch["seq_index"]
        return {"rows": torch.tensor(rows), "chosen_tokens": (scored & (seq >= 0) & (seq < rows)).sum()}

    # --------------------------------------------------------------------------------------- forward
    def policy_logps(self, model: torch.nn.Module, inputs: dict[str, Any]) -> SequenceLogps:
        """Per-sequence policy log-probs of the whole collated batch in one forward."""
        return sequence_logps(model, inputs, chunk_size=self.args.logits_chunk_size, with_logits_mean=True)

    def row_mean(self, losses: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """Per-row losses ``[B]`` summed and divided by the optimizer step's row count (this batch's in eval)."""
        return losses.sum() / self.loss_denominator(num_items_in_batch, "rows", losses.numel()).to(losses.device)

    def chosen_token_nll(self, out: SequenceLogps, n: int, num_items_in_batch: Any) -> torch.Tensor:
        """NLL of the chosen responses (the first ``n`` sequences), token mean over the optimizer step."""
        denom = self.loss_denominator(num_items_in_batch, "chosen_tokens", out.lengths[:n].sum())
        return chosen_nll(out.logps[:n], out.lengths[:n], num_tokens=denom)

    def finish_loss(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], return_outputs: bool) -> Any:
        """Store this micro-batch's metrics and return what ``compute_loss`` must return."""
        self.store_metrics(metrics)
        return (loss, metrics) if return_outputs else loss

    @staticmethod
    def pair_logp_metrics(out: SequenceLogps, n_pairs: int) -> dict[str, torch.Tensor]:
        """``logps/chosen|rejected`` (summed log-prob means) and ``logits/chosen|rejected`` (mean logits)."""
        lp = out.logps.detach()
        metrics = {"logps/chosen": lp[:n_pairs].mean(), "logps/rejected": lp[n_pairs:].mean()}
        if out.logits_mean is not None:
            metrics["logits/chosen"] = out.logits_mean[:n_pairs].mean()
            metrics["logits/rejected"] = out.logits_mean[n_pairs:].mean()
        return metrics


class ReferenceFreeTrainerBase(PreferenceTrainerBase):
    """Pairwise methods without a reference model (CPO, ORPO), with TRL's constructor: ``(model, args,
    data_collator, train_dataset, eval_dataset, processing_class, model_init, callbacks, optimizers,
    preprocess_logits_for_metrics, peft_config, compute_metrics)``."""

    def __init__(
        self,
        model: ModelArg = None,
        args: PreferenceConfig | TrainingArguments | None = None,
        data_collator: CollatorArg = None,
        train_dataset: DatasetArg = None,
        eval_dataset: EvalDatasetArg = None,
        processing_class: ProcessingClassArg = None,
        model_init: ModelInitArg = None,
        callbacks: CallbacksArg = None,
        optimizers: OptimizersArg = (None, None),
        preprocess_logits_for_metrics: LogitsFn = None,
        peft_config: PeftConfigArg = None,
        compute_metrics: MetricsFn = None,
    ) -> None:
        super(
            ).__init__(model, None, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
            callbacks=callbacks, optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics, peft_config=peft_config,
            compute_metrics=compute_metrics)
