"""Config fields every posttrain config shares with TRL's configs beyond `transformers.TrainingArguments`:
model loading (``trust_remote_code``), memory (``activation_offloading``), mixture-of-experts
(``router_aux_loss_coef``) and the tokenizer (``pad_token``, ``eos_token``, ``chat_template_path``). What
each does is in its help; the trainer applies them in `PostTrainer.__init__` (see `_compat`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TRLSharedFields", "SFTDataFields", "rename_text_field", "resolve_pad_to_multiple_of", "PAD_TO_MULTIPLE_HELP"]

PAD_TO_MULTIPLE_HELP = ("Pad each batch's rows to a multiple of this many tokens. 'auto' (TRL's default): a multiple "
                        "of 128 on AWS Neuron (one compilation per shape), no rounding elsewhere. None: no rounding.")


def resolve_pad_to_multiple_of(value: int | str | None) -> int | None:
    """TRL's ``pad_to_multiple_of`` as a number or None: 'auto' is None here (posttrain never runs on Neuron),
    command-line strings ('8', 'none') are parsed."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        if value.lower() in ("none", "null"):
            return None
        value = int(value)
    if value < 1:
        raise ValueError(f"pad_to_multiple_of={value}: expected a positive integer, 'auto' or None")
    return value


@dataclass
class TRLSharedFields:
    trust_remote_code: bool = field(default=False, metadata={"help": (
        "Allow a model or tokenizer from the hub to run its own Python code when loaded by name.")})
    activation_offloading: bool = field(default=False, metadata={"help": (
        "Keep the activations saved for the backward pass in (pinned) host memory, saving accelerator memory at "
        "the cost of transfers. No effect on a CPU (warned).")})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": (
        "Weight of a mixture-of-experts model's router load-balancing loss, added to the method's loss. None: the "
        "model config's own coefficient (on by default for MoE models, as in TRL); 0 turns it off; warned for a "
        "dense model.")})
    pad_token: str | None = field(default=None, metadata={"help": (
        "Token to pad with (must be in the vocabulary). Default: the tokenizer's pad token, else its EOS.")})
    eos_token: str | None = field(default=None, metadata={"help": (
        "End-of-sequence token set on the trainer's tokenizer (must be in the vocabulary); the tokenizer's own "
        "otherwise.")})
    chat_template_path: str | None = field(default=None, metadata={"help": (
        "A Jinja chat template file, or a tokenizer folder whose chat template is used (instead of "
        "chat_template).")})


@dataclass
class SFTDataFields:
    """TRL's SFTConfig data and loss fields, shared by `SFTConfig` and `GKDConfig` (TRL's GKDConfig subclasses
    SFTConfig). The help texts say what they do in SFT; GKD's docstring says what each does there. Checked and
    normalized by `resolve_sft_data_fields` (called from the configs' ``__post_init__``)."""

    dataset_text_field: str = field(
        default="text",
        metadata={"help": "Column holding the text (or the conversation) of language-modeling rows."})
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
        default=False,
        metadata={"help": "Loss on assistant turns only for conversational language-modeling data (as TRL, off by "
                  "default: the loss covers the whole conversation)."},
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "nll: cross-entropy; dft: dynamic fine-tuning (token NLL weighted by its detached "
                  "probability, Wu et al. 2025)."},
    )
    packing_strategy: str = field(default="bfd", metadata={"help": (
        "With packing: 'bfd' (best-fit decreasing; rows longer than max_length are truncated first), 'bfd_split' "
        "(long rows are split into pieces that are packed instead), 'wrapped' (all rows concatenated and cut every "
        "max_length tokens, mid-sequence).")})
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval dataset (None: as packing)."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": PAD_TO_MULTIPLE_HELP})
    truncation_mode: str = field(default="keep_start", metadata={"help": (
        "Rows longer than max_length: 'keep_start' keeps the first tokens; 'keep_end' (deprecated in TRL) the last.")})
    shuffle_dataset: bool = field(default=False, metadata={"help": (
        "Shuffle the prepared training dataset once (seeded) before training (the sampler shuffles each epoch "
        "anyway; this also mixes what packing puts together).")})
    dataset_kwargs: dict | str | None = field(default=None, metadata={"help": (
        "Dataset preparation options (TRL): {\"skip_prepare_dataset\": true} uses an already tokenized dataset "
        "(input_ids) as is, with no formatting or template step; any other key is an error.")})

    def resolve_sft_data_fields(self) -> None:
        """Check the values (a clear error naming the field) and normalize the command-line forms: TRL's former
        'bfd-requeue', a JSON string for dataset_kwargs, 'auto' / '8' for pad_to_multiple_of."""
        if self.loss_type not in ("nll", "dft"):
            raise ValueError(f"loss_type must be 'nll' or 'dft', got {self.loss_type!r}")
        if self.packing_strategy == "bfd-requeue":  # TRL's former name
            self.packing_strategy = "bfd_split"
        if self.packing_strategy not in ("bfd", "bfd_split", "wrapped"):
            raise ValueError(f"packing_strategy={self.packing_strategy!r}: expected 'bfd', 'bfd_split' or 'wrapped'")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode={self.truncation_mode!r}: expected 'keep_start' or 'keep_end'")
        if isinstance(self.dataset_kwargs, str):
            self.dataset_kwargs = json.loads(self.dataset_kwargs)
        unknown = sorted(set(self.dataset_kwargs or {}) - {"skip_prepare_dataset"})
        if unknown:
            raise ValueError(f"dataset_kwargs: unsupported keys {unknown} (supported: skip_prepare_dataset)")
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)


def rename_text_field(dataset: Any, text_field: str, name: str) -> Any:
    """``dataset`` (a `datasets.Dataset`) with its ``text_field`` column renamed to what the data pipeline
    reads: ``messages`` when it holds conversations, else ``text`` (TRL's ``dataset_text_field``)."""
    from ..data import DatasetFormatError

    if text_field in ("text", "messages"):
        return dataset
    columns = dataset.column_names
    if text_field not in columns:
        raise DatasetFormatError(f"{name}: dataset_text_field={text_field!r} names no column of the dataset "
                                 f"(columns: {sorted(columns)})")
    first = next((v for v in dataset.with_format("arrow")[text_field].to_pylist() if v is not None), None)
    target = "messages" if isinstance(first, list) else "text"
    if target in columns:
        dataset = dataset.remove_columns(target)
    return dataset.rename_column(text_field, target)
