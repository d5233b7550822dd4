"""Supervised fine-tuning: cross-entropy on completions (or assistant turns), with the DFT variant.

Log-probs come from hidden states and the output head in chunks (`posttrain.ops`), so no
`[batch, length, vocab]` logits tensor is ever held; batches are padding-free by default.

Data, as TRL's SFTTrainer takes it: language modeling (`text`, or the column `dataset_text_field` names, or
`messages`), prompt-completion, the text a `formatting_func(row) -> str` makes of each row, or a dataset
already tokenized (`input_ids`, with optional `completion_mask`, `assistant_masks`, `attention_mask` and
`labels`), which is used as is. The loss is the token mean over every completion token of the optimizer step
(all micro-batches and processes), so gradient accumulation does not change it. Rows left with no token to
train on are dropped before training, counted and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction

from ..data import DatasetFormatError, DatasetKind, FormatInfo, PaddingCollator, PaddingFreeCollator, load_any, load_held_out
from ..data.packing import pack_wrapped, split_long_rows
from ..data.streaming import is_stream
from ..data.vision import (VisionCollator, attach_images, image_column, row_images, tokenize_vision_messages,
                           vision_inputs)
from ..models import uses_mrope
from ..data import pack_dataset, tokenize_messages, tokenize_prompt_completion, tokenize_text, validate_dataset
from ..losses.sft import sft_loss
from ..ops import token_logps
from ..ops.forward import prediction_mask
from ._loss_items import LossItemsMixin
from ._trl_fields import SFTDataFields, rename_text_field
from .base import PostTrainConfig, PostTrainer
from .registry import register_method

logger = logging.getLogger(__name__)

EMPTY_ROW_REASON = ("none of their tokens is in the loss: e.g. a conversation without an assistant turn under "
                    "assistant_only_loss, or a prompt that fills max_length")

__all__ = ["SFTConfig", "SFTTrainer"]


@dataclass
class SFTConfig(SFTDataFields, PostTrainConfig):
    """Configuration of `SFTTrainer` (field names follow TRL's SFTConfig where they overlap)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW."})
    padding_free: bool = field(
        default=True,
        metadata={"help": "Flatten each batch into one row with per-sequence position ids: no compute on padding, "
                  "and sequences never attend to each other."},
    )
    log_entropy: bool = field(default=False, metadata={"help": "Also compute and log the mean token entropy."})

    def __post_init__(self) -> None:
        self.resolve_sft_data_fields()
        super().__post_init__()


class SFTTrainer(LossItemsMixin, PostTrainer):
    """Supervised fine-tuning on language-modeling or prompt-completion data, plain or conversational, or on
    already tokenized rows. TRL-shaped: `SFTTrainer(model, args, ..., formatting_func=None)`."""

    accepted_formats: ClassVar = (DatasetKind.LANGUAGE_MODELING, DatasetKind.PROMPT_COMPLETION, DatasetKind.TOKENIZED)
    config_class: ClassVar = SFTConfig
    _tag_names: ClassVar = ["posttrain", "sft"]

    accepts_compute_loss_func: ClassVar[bool] = True

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
        train_dataset: datasets.Dataset | datasets.IterableDataset | Any | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | Any | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any | None = None,
        peft_config: Any | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ) -> None:
        self.formatting_func = formatting_func  # prepare_dataset, run inside the base __init__, reads it
        if formatting_func is not None and args is not None and getattr(args, "completion_only_loss", None):
            raise ValueError("formatting_func turns every row into plain text, which has no completion to restrict "
                             "the loss to: drop completion_only_loss=True or format the rows yourself")
        super().__init__(
            model, args=args, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, peft_config=peft_config, callbacks=callbacks, optimizers=optimizers,
            compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics, quantization_config=quantization_config,
        )

    # ------------------------------------------------------------------------------------------ data
    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        args: SFTConfig = self.args
        tok = self.tokenizer
        images, extra = None, {}
        if info.kind == DatasetKind.TOKENIZED:
            input_ids, mask = _pretokenized(row, completion_only=args.completion_only_loss is not False)
        elif self.processor is not None and info.conversational:
            input_ids, mask, images, extra = self._tokenize_vision(row, info)
        elif info.kind == DatasetKind.PROMPT_COMPLETION:
            out = tokenize_prompt_completion(tok, row["prompt"], row["completion"], tools=row.get("tools"))
            input_ids = out["prompt_ids"] + out["completion_ids"]
            completion_only = args.completion_only_loss is not False
            mask = [0 if completion_only else 1] * len(out["prompt_ids"]) + [1] * len(out["completion_ids"])
        elif info.conversational:
            out = tokenize_messages(tok, row["messages"], tools=row.get("tools"))
            input_ids = out["input_ids"]
            mask = out["assistant_mask"] if args.assistant_only_loss else [1] * len(input_ids)
        else:
            input_ids = tokenize_text(tok, row["text"])["input_ids"]
            mask = [1] * len(input_ids)
        split_later = args.packing and args.packing_strategy != "bfd"  # pieces are packed, nothing is cut
        truncated = args.max_length is not None and len(input_ids) > args.max_length and not split_later
        if truncated and args.truncation_mode == "keep_end":
            input_ids, mask = input_ids[-args.max_length:], mask[-args.max_length:]
        elif truncated:
            input_ids, mask = input_ids[: args.max_length], mask[: args.max_length]
        out = {"input_ids": input_ids, "completion_mask": mask, "truncated": truncated}
        if images is not None:
            if truncated and images:
                raise ValueError(f"a row with {len(images)} image(s) is longer than max_length={args.max_length}: "
                                 "cutting it would cut its image tokens apart from its pixels; raise max_length")
            if not getattr(self, "_defer_images", False):
                out["images"] = images
        for key, values in extra.items():  # per-token processor outputs (mm_token_type_ids), cut like the ids
            out[key] = values[-len(input_ids):] if truncated and args.truncation_mode == "keep_end" else \
                values[: len(input_ids)]
        return out

    def _tokenize_vision(self, row: dict, info: FormatInfo) -> tuple[list[int], list[int], list[Any] | None, dict]:
        """A conversational row through the VLM's processor: image tokens expanded, never in the loss. Returns
        the ids, the loss mask, the row's images (None when the dataset has no image column) and the per-token
        fields the processor adds (`mm_token_type_ids`)."""
        args: SFTConfig = self.args
        images = row_images(row) if info.image_column else []
        if info.kind == DatasetKind.PROMPT_COMPLETION:
            prompt = list(row["prompt"])
            out = tokenize_vision_messages(self.processor, prompt + list(row["completion"]), images,
                                           tools=row.get("tools"), prompt_messages=len(prompt))
            completion_only = args.completion_only_loss is not False
        else:
            out = tokenize_vision_messages(self.processor, row["messages"], images, tools=row.get("tools"))
            completion_only = args.assistant_only_loss
        if completion_only:
            mask = out["assistant_mask"]
        else:
            mask = [1 - m for m in out["image_mask"]]
        extra = {k: out[k] for k in ("mm_token_type_ids",) if k in out}
        return out["input_ids"], mask, (images if info.image_column else None), extra

    def check_format(self, info: FormatInfo) -> None:
        if info.image_column and self.processor is None:
            raise ValueError(f"the dataset has images (an {info.image_column!r} column) but processing_class is a "
                             "tokenizer: pass the model's processor (AutoProcessor) to read them")
        if info.image_column and self.args.packing:
            raise ValueError("packing=True with images is not supported yet: packed rows would mix images of several "
                             "examples; train with packing=False (padding_free=True still avoids padding where the "
                             "model's position ids allow it)")
        if info.image_column and not info.conversational:
            raise ValueError("images go with conversational rows (content parts {'type': 'image'}); this dataset "
                             "holds plain text")
        if self.args.assistant_only_loss and info.kind is DatasetKind.LANGUAGE_MODELING and not info.conversational:
            raise ValueError("assistant_only_loss=True needs conversational data (a 'messages' column); this "
                             "dataset holds plain text, which has no assistant turns")

    def _formatting_row(self) -> Callable[[dict, int], dict]:
        """`formatting_func` as a row function: the row becomes `{"text": formatting_func(row)}`."""
        func = self.formatting_func

        def format_row(row: dict, index: int) -> dict:
            text = func(row)
            if not isinstance(text, str):
                raise DatasetFormatError(f"row {index}: formatting_func must return a string (the row's text), "
                                         f"got {type(text).__name__}")
            return {"text": text}

        return format_row

    def stream_row_formatter(self, name: str) -> Callable[[dict, int], dict] | None:
        """Streams get per row what `text_dataset` does to a dataset: `formatting_func`, or the
        `dataset_text_field` column read as `text` (`messages` when it holds a conversation)."""
        if self.formatting_func is not None:
            return self._formatting_row()
        text_field = self.args.dataset_text_field
        if text_field in ("text", "messages"):
            return None

        def rename(row: dict, index: int) -> dict:
            if text_field not in row or "input_ids" in row:
                return row
            value = row.pop(text_field)
            row["messages" if isinstance(value, list) else "text"] = value
            return row

        return rename

    def stream_options(self, info: FormatInfo, name: str) -> dict[str, Any]:
        if info.image_column:
            raise ValueError(f"{name}: streamed datasets with images are not supported yet; load the dataset "
                             "(not streaming=True) to train on images")
        if self.args.packing and self.args.max_length is None:
            raise ValueError("packing=True needs max_length (the length of a packed row)")
        return {"keep": lambda row: any(row["completion_mask"][1:]),
                "pack_length": self.args.max_length if self.args.packing else None}

    def text_dataset(self, dataset: Any, name: str) -> datasets.Dataset:
        """The dataset as the data pipeline reads it: `formatting_func` applied (each row becomes its `text`),
        or the `dataset_text_field` column renamed to `text` (`messages` when it holds conversations). A dataset
        already tokenized (`input_ids`) is returned as is."""
        if (self.args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            dataset = load_held_out(dataset) if name.startswith("eval") else load_any(dataset)
            if "input_ids" not in dataset.column_names:
                raise DatasetFormatError(f"{name}: dataset_kwargs skip_prepare_dataset=True needs a tokenized dataset "
                                         f"(an 'input_ids' column); columns: {sorted(dataset.column_names)}")
            return dataset
        plain_columns = self.formatting_func is None and self.args.dataset_text_field in ("text", "messages")
        if isinstance(dataset, (list, tuple, dict)) and plain_columns:
            # Python rows are checked before Arrow conversion, which fails on a mistyped row without saying which.
            validate_dataset(dataset, self.accepted_formats)
        dataset = load_held_out(dataset) if name.startswith("eval") else load_any(dataset)
        columns = dataset.column_names
        if "input_ids" in columns:
            if self.formatting_func is not None:
                logger.warning("%s: the dataset is already tokenized (it has 'input_ids'); formatting_func is "
                               "not applied", name)
            return dataset
        if self.formatting_func is not None:
            return dataset.map(self._formatting_row(), with_indices=True, remove_columns=columns,
                               num_proc=self.args.dataset_num_proc, desc=f"Applying formatting_func to {name}")
        return rename_text_field(dataset, self.args.dataset_text_field, name)

    def prepare_dataset(self, dataset: Any, name: str):
        if is_stream(dataset):
            return super().prepare_dataset(dataset, name)
        text = self.text_dataset(dataset, name)
        column = image_column(text.column_names) if self.processor is not None else None
        self._defer_images = column is not None  # attached typed after tokenization (see attach_images)
        try:
            tokenized = super().prepare_dataset(text, name)
        finally:
            self._defer_images = False
        if column is not None:
            tokenized = attach_images(tokenized, load_held_out(text) if name.startswith("eval") else load_any(text),
                                      column)
        # The first token of every sequence has no prediction, so a mask set only there trains nothing.
        keep = [any(mask[1:]) for mask in tokenized.with_format("arrow")["completion_mask"].to_pylist()]
        tokenized = self.drop_rows_without_loss(tokenized, name, keep, EMPTY_ROW_REASON)
        args = self.args
        packing = args.packing if not name.startswith("eval") or args.eval_packing is None else args.eval_packing
        if packing:
            if args.max_length is None:
                raise ValueError("packing=True needs max_length (the length of a packed row)")
            if args.packing_strategy == "wrapped":
                tokenized = pack_wrapped(tokenized, args.max_length)
            else:
                if args.packing_strategy == "bfd_split":
                    tokenized = split_long_rows(tokenized, args.max_length)
                tokenized = pack_dataset(tokenized, args.max_length)
        if name == "train" and args.shuffle_dataset:
            tokenized = tokenized.shuffle(seed=args.seed)
        return tokenized

    def make_collator(self) -> Any:
        pad_id = self.tokenizer.pad_token_id
        flat = self.args.padding_free or self.args.packing
        if flat and self.processor is not None and uses_mrope(self._model_config):
            if self.args.packing:
                raise ValueError("packing=True: this model computes M-RoPE position ids from its images, which "
                                 "packed rows cannot give it; train with packing=False")
            logger.info("padded batches: this model's M-RoPE position ids cannot be given padding-free")
            flat = False
        if flat:
            collator = PaddingFreeCollator(pad_to_multiple_of=self.args.pad_to_multiple_of, pad_token_id=pad_id)
        else:
            collator = PaddingCollator(pad_token_id=pad_id, pad_to_multiple_of=self.args.pad_to_multiple_of)
        return VisionCollator(self.processor, collator) if self.processor is not None else collator

    # ------------------------------------------------------------------------------------------ loss
    def count_loss_items(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Completion tokens that have a prediction: what the token-mean loss averages over."""
        mask = prediction_mask(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                               batch["completion_mask"])
        return {"tokens": mask.sum()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._user_loss_func is not None:
            return self._compute_user_loss(model, inputs, return_outputs, num_items_in_batch)
        mask = inputs["completion_mask"].bool()
        out = token_logps(
            model,
            inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            mask=mask,
            with_entropy=self.args.log_entropy,
            with_argmax=True,
            chunk_size=self.args.logits_chunk_size,
            **vision_inputs(inputs),
        )
        mask = out.mask if getattr(out, "mask", None) is not None else mask
        # Token mean over the optimizer step's completion tokens (all micro-batches, all processes).
        n_items = self.loss_denominator(num_items_in_batch, "tokens", mask.sum())
        loss, metrics = sft_loss(out.logps, mask, dft=self.args.loss_type == "dft", num_items=n_items)
        with torch.no_grad():
            n_tokens = mask.sum()
            if out.argmax is not None:
                correct = (out.argmax == inputs["input_ids"]) & mask
                metrics["mean_token_accuracy"] = correct.sum() / n_tokens.clamp(min=1)
            if out.entropy is not None:
                metrics["entropy"] = (out.entropy * mask).sum() / n_tokens.clamp(min=1)
            attention = inputs.get("attention_mask")
            seen = attention.sum() if attention is not None else inputs["input_ids"].numel()
            seen = self.accelerator.gather_for_metrics(torch.as_tensor(seen, device=mask.device).reshape(1)).sum()
            self._totals[f"{self._mode}/num_tokens"] += float(seen)
            metrics["num_loss_tokens"] = n_tokens.float()
        self.store_metrics(metrics)
        return (loss, out) if return_outputs else loss

    def _compute_user_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """TRL's ``compute_loss_func(outputs, labels, num_items_in_batch=...)``: the model's outputs (with logits,
        as the user's function expects them), the unshifted labels (-100 outside the loss) and the step's count of
        loss tokens."""
        labels = inputs["input_ids"].masked_fill(~inputs["completion_mask"].bool(), -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        position_ids=inputs.get("position_ids"), use_cache=False, **vision_inputs(inputs))
        loss = self._user_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def eval_predictions(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> tuple[Any, Any]:
        """What TRL's SFTTrainer gives `compute_metrics`: `predictions [B, L, vocab]`, the logits of every
        position (one extra forward, only when `compute_metrics` or `predict()` asks for them; the loss never
        holds them), and `label_ids [B, L]`, the input ids where the loss is taken and -100 elsewhere
        (unshifted: the logits at position t predict the label at t + 1). Padding-free batches are split back
        into one row per sequence, padded with -100."""
        ids = inputs["input_ids"]
        labels = ids.masked_fill(~inputs["completion_mask"].bool(), -100)
        if "seq_lens" not in inputs:
            logits = model(input_ids=ids, attention_mask=inputs.get("attention_mask"), use_cache=False,
                           **vision_inputs(inputs)).logits
            return logits, labels
        if self.args.packing:
            raise ValueError("compute_metrics and predict() need one row per example, but packing=True packs "
                             "several examples per row; evaluate without packing (packing=False)")
        logits = model(input_ids=ids, position_ids=inputs["position_ids"], use_cache=False,
                       **vision_inputs(inputs)).logits[0]
        lengths = [int(n) for n in inputs["seq_lens"]]
        return _rows(logits, lengths), _rows(labels[0], lengths)


def _rows(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A padding-free row's per-token values `[T, ...]` as one row per sequence `[S, max(lengths), ...]`, -100 after
    each sequence's end."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(lengths)), batch_first=True, padding_value=-100)


def _pretokenized(row: Mapping[str, Any], completion_only: bool) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of an already tokenized row: the positions outside `attention_mask` are dropped
    (padding); the mask is `assistant_masks` and `labels != -100` where given, and `completion_mask` where
    given unless `completion_only` is off (completion_only_loss=False)."""
    ids = list(row["input_ids"])
    mask = [1] * len(ids)
    masks = [row.get("assistant_masks")]
    if completion_only:
        masks.append(row.get("completion_mask"))
    labels = row.get("labels")
    if labels is not None:
        wrong = next((t for t, (i, y) in enumerate(zip(ids, labels)) if y != -100 and y != i), None)
        if wrong is not None:
            raise DatasetFormatError(f"'labels' differ from 'input_ids' at token {wrong} (label {labels[wrong]}, "
                                     f"token {ids[wrong]}): SFT reads labels only as a mask (-100: no loss), "
                                     "aligned with input_ids and not shifted")
        masks.append([int(y != -100) for y in labels])
    for extra in masks:
        if extra is not None:
            mask = [m & int(e) for m, e in zip(mask, extra)]
    attention = row.get("attention_mask")
    if attention is not None:
        ids = [i for i, a in zip(ids, attention) if a]
        mask = [m for m, a in zip(mask, attention) if a]
    return ids, mask


register_method(
    "sft", SFTConfig, SFTTrainer,
    help="Supervised fine-tuning on demonstrations (cross-entropy on completions; DFT with --loss_type dft).",
    task_format="prompt_completion",
)
