"""Supervised fine-tuning: cross-entropy on completions (or assistant turns), with the DFT variant.

Log-probs come from hidden states and the output head in chunks (`posttrain.ops`), so no
`[batch, length, vocab]` logits tensor is ever held; batches are padding-free by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..data import DatasetKind, FormatInfo, PaddingCollator, PaddingFreeCollator, pack_dataset
from ..data import tokenize_messages, tokenize_prompt_completion, tokenize_text
from ..losses.sft import sft_loss
from ..ops import token_logps
from .base import PostTrainConfig, PostTrainer
from .registry import register_method

__all__ = ["SFTConfig", "SFTTrainer"]


@dataclass
class SFTConfig(PostTrainConfig):
    """Configuration of `SFTTrainer` (field names follow TRL's SFTConfig where they overlap)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding plain text for language modeling."})
    padding_free: bool = field(
        default=True,
        metadata={"help": "Flatten each batch into one row with per-sequence position ids: no compute on padding, "
                  "and sequences never attend to each other."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack tokenized rows into rows of up to max_length (best-fit decreasing), keeping "
                  "per-sequence position ids so packed sequences stay isolated."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on completion tokens only for prompt-completion data. None: yes."},
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on assistant turns only for conversational language-modeling data."},
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "nll: cross-entropy; dft: dynamic fine-tuning (token NLL weighted by its detached "
                  "probability, Wu et al. 2025)."},
    )
    log_entropy: bool = field(default=False, metadata={"help": "Also compute and log the mean token entropy."})

    def __post_init__(self) -> None:
        if self.loss_type not in ("nll", "dft"):
            raise ValueError(f"loss_type must be 'nll' or 'dft', got {self.loss_type!r}")
        super().__post_init__()


class SFTTrainer(PostTrainer):
    """Supervised fine-tuning on language-modeling or prompt-completion data, plain or conversational."""

    accepted_formats: ClassVar = (DatasetKind.LANGUAGE_MODELING, DatasetKind.PROMPT_COMPLETION)
    config_class: ClassVar = SFTConfig
    _tag_names: ClassVar = ["posttrain", "sft"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # We normalize per micro-batch ourselves; the Trainer then divides by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    # ------------------------------------------------------------------------------------------ data
    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        args: SFTConfig = self.args
        tok = self.tokenizer
        if info.kind == DatasetKind.PROMPT_COMPLETION:
            out = tokenize_prompt_completion(tok, row["prompt"], row["completion"])
            input_ids = out["prompt_ids"] + out["completion_ids"]
            completion_only = args.completion_only_loss is not False
            mask = [0 if completion_only else 1] * len(out["prompt_ids"]) + [1] * len(out["completion_ids"])
        elif info.conversational:
            out = tokenize_messages(tok, row["messages"], tools=row.get("tools"))
            input_ids = out["input_ids"]
            mask = out["assistant_mask"] if args.assistant_only_loss else [1] * len(input_ids)
        else:
            input_ids = tokenize_text(tok, row[args.dataset_text_field])["input_ids"]
            mask = [1] * len(input_ids)
        truncated = args.max_length is not None and len(input_ids) > args.max_length
        if truncated:
            input_ids, mask = input_ids[: args.max_length], mask[: args.max_length]
        return {"input_ids": input_ids, "completion_mask": mask, "truncated": truncated}

    def prepare_dataset(self, dataset: Any, name: str):
        tokenized = super().prepare_dataset(dataset, name)
        if self.args.packing:
            if self.args.max_length is None:
                raise ValueError("packing=True needs max_length (the length of a packed row)")
            tokenized = pack_dataset(tokenized, self.args.max_length)
        return tokenized

    def make_collator(self) -> Any:
        pad_id = self.tokenizer.pad_token_id
        if self.args.padding_free or self.args.packing:
            return PaddingFreeCollator()
        return PaddingCollator(pad_token_id=pad_id)

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
        )
        mask = out.mask if getattr(out, "mask", None) is not None else mask
        loss, metrics = sft_loss(out.logps, mask, dft=self.args.loss_type == "dft")
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

    def eval_predictions(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> tuple[Any, Any]:
        """What TRL's SFTTrainer gives `compute_metrics`: `predictions [B, L, vocab]`, the logits of every
        position (one extra forward, only when `compute_metrics` or `predict()` asks for them; the loss never
        holds them), and `label_ids [B, L]`, the input ids where the loss is taken and -100 elsewhere
        (unshifted: the logits at position t predict the label at t + 1). Padding-free batches are split back
        into one row per sequence, padded with -100."""
        ids = inputs["input_ids"]
        labels = ids.masked_fill(~inputs["completion_mask"].bool(), -100)
        if "seq_lens" not in inputs:
            logits = model(input_ids=ids, attention_mask=inputs.get("attention_mask"), use_cache=False).logits
            return logits, labels
        if self.args.packing:
            raise ValueError("compute_metrics and predict() need one row per example, but packing=True packs "
                             "several examples per row; evaluate without packing (packing=False)")
        logits = model(input_ids=ids, position_ids=inputs["position_ids"], use_cache=False).logits[0]
        lengths = [int(n) for n in inputs["seq_lens"]]
        return _rows(logits, lengths), _rows(labels[0], lengths)


def _rows(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A padding-free row's per-token values `[T, ...]` as one row per sequence `[S, max(lengths), ...]`, -100 after
    each sequence's end."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(lengths)), batch_first=True, padding_value=-100)


register_method(
    "sft", SFTConfig, SFTTrainer,
    help="Supervised fine-tuning on demonstrations (cross-entropy on completions; DFT with --loss_type dft).",
    task_format="prompt_completion",
)
