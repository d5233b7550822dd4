"""Base of the unpaired preference trainers (KTO, BCO): rows are ``(prompt, completion, label)``.

Paired preference data is accepted too and unpaired first (each pair becomes a desirable and an undesirable
row, see :func:`posttrain.data.unpair_preference`). Batches hold one sequence per row; KTO adds a second group
of sequences for its KL reference point (each prompt with another row's completion).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import datasets
import torch

from ..data import DatasetKind, FormatInfo, unpair_preference
from ..data.formats import unpair_row
from ..data.streaming import is_stream
from ._pref_base import PreferenceTrainerBase, ReferenceConfig
from ._preference import SequenceCollator, tokenize_completions

__all__ = ["UnpairedConfig", "UnpairedTrainerBase", "KLCollator", "unpaired_summary"]


@dataclass
class UnpairedConfig(ReferenceConfig):
    """Fields shared by `KTOConfig` and `BCOConfig`: the class weights of desirable and undesirable rows
    (lambda_D and lambda_U of the KTO paper), e.g. to balance a dataset with more thumbs-down than thumbs-up."""

    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of undesirable examples' losses."})


class KLCollator(SequenceCollator):
    """Completion sequences as usual, plus ``kl_batch``: the same prompts with mismatched completions."""

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        batch = super().__call__(features)
        kl = SequenceCollator(self.pad_token_id, (("prompt_ids", "kl_completion_ids"),),
                              padding_free=self.padding_free, pad_to_multiple_of=self.pad_to_multiple_of)
        batch["kl_batch"] = kl(features)
        return batch


class UnpairedTrainerBase(PreferenceTrainerBase):
    """Tokenizes unpaired rows and reports label-split metrics; subclasses write ``compute_loss``."""

    accepted_formats: ClassVar = (DatasetKind.UNPAIRED_PREFERENCE, DatasetKind.PREFERENCE)
    uses_reference: ClassVar[bool] = True
    seq_fields: ClassVar = (("prompt_ids", "completion_ids"),)
    ref_columns: ClassVar[tuple[str, ...]] = ("ref_logps",)
    token_columns: ClassVar[tuple[str, ...]] = ("prompt_ids", "completion_ids", "kl_completion_ids")
    needs_kl: ClassVar[bool] = False

    def preprocess_dataset(self, dataset: datasets.Dataset, info: FormatInfo) -> datasets.Dataset:
        if info.kind is DatasetKind.PREFERENCE:
            dataset = unpair_preference(dataset)
        return dataset

    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        prompt_ids, (completion,), truncated = tokenize_completions(
            self.tokenizer, row["prompt"], [row["completion"]], **self.truncation_kwargs(), tools=row.get("tools"))
        return {"prompt_ids": prompt_ids, "completion_ids": completion, "label": bool(row["label"]),
                "truncated": truncated}

    def prepare_dataset(self, dataset: Any, name: str) -> datasets.Dataset:
        tokenized = super().prepare_dataset(dataset, name)
        if self.needs_kl and not is_stream(tokenized):
            tokenized = add_mismatched_completions(tokenized)
        return tokenized

    def stream_options(self, info: FormatInfo, name: str) -> dict[str, Any]:
        """Streamed pairs are unpaired row by row; the KL completions are mismatched within each window of
        `KL_WINDOW` rows (the whole-dataset rule of `add_mismatched_completions`, on a bounded window)."""
        options = super().stream_options(info, name)
        if info.kind is DatasetKind.PREFERENCE:
            split = options["expand"]
            options["expand"] = lambda row: unpair_row(split(row)[0] if split else row)
        if self.needs_kl:
            options.update(window=_mismatched_window, window_size=KL_WINDOW)
        return options

    def make_collator(self) -> SequenceCollator:
        cls = KLCollator if self.needs_kl else SequenceCollator
        return cls(self.pad_id, self.seq_fields, padding_free=self.args.padding_free,
                   passthrough=self.ref_columns + ("label", "udm_weight"),
                   pad_to_multiple_of=self.args.pad_to_multiple_of)


def add_mismatched_completions(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add ``kl_completion_ids``: row ``i`` gets the completion of row ``(i + n // 2) % n``.

    A fixed half-length shift never pairs a row with itself (n > 1) nor with its sibling from an unpaired
    pair (rows 2k, 2k+1 share a prompt), and being fixed it lets the reference side be precomputed.
    """
    return dataset.add_column("kl_completion_ids", _mismatched(list(dataset["completion_ids"])))


def _mismatched(completions: list) -> list:
    n = len(completions)
    shift = n // 2 if n > 1 else 0
    return [completions[(i + shift) % n] for i in range(n)]


KL_WINDOW = 64  # rows of a stream whose completions are mismatched together (an even number: pairs stay together)


def _mismatched_window(rows: list[dict]) -> list[dict]:
    return [{**row, "kl_completion_ids": kl} for row, kl in zip(rows, _mismatched([r["completion_ids"] for r in rows]))]


def unpaired_summary(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn label-split sums and counts into the means users expect; drop the raw sums."""
    out = {k: v for k, v in metrics.items() if not k.endswith("_sum") and not k.startswith("count/")}
    n_c, n_r = metrics["count/chosen"], metrics["count/rejected"]
    if n_c > 0:
        out["logps/chosen"] = metrics["logps/chosen_sum"] / n_c
    if n_r > 0:
        out["logps/rejected"] = metrics["logps/rejected_sum"] / n_r
    if n_c > 0 and n_r > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
