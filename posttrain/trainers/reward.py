"""Outcome reward modeling: a one-score head trained on preference pairs with the Bradley-Terry loss.

Any causal LM (the score is read at the last non-pad token) or encoder (BERT-like: read from the CLS
pooler) becomes a reward model. Chosen and rejected sequences of a batch run in one forward pass.
The loss (with the Llama 2 margin and the centering term) lives in `posttrain.losses.reward`; the text
encoding is shared with the inference-side scorer (`posttrain.online.rewards.inputs`), so a saved model
scores completions through `posttrain.online.RewardModelScorer` exactly as it was trained.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import datasets
import torch
from transformers import TrainingArguments

from ..data import DatasetFormatError, DatasetKind, FormatInfo, load_any, load_held_out, split_implicit_prompt, validate_dataset
from ..losses.reward import bradley_terry_loss
from ..online.rewards.inputs import encode_outcome, pad_right
from ..online.rewards.reward_model import score_outcomes
from ._compat import (CallbacksArg, CollatorArg, DatasetArg, EvalDatasetArg, LogitsFn, MetricsFn, ModelArg, ModelInitArg,
                      OptimizerClsArg, OptimizersArg, PeftConfigArg, ProcessingClassArg, QuantizationArg)
from ._reward_base import RewardHeadConfig, RewardHeadTrainer
from ._trl_fields import PAD_TO_MULTIPLE_HELP, resolve_pad_to_multiple_of
from .registry import register_method

__all__ = ["RewardConfig", "RewardTrainer", "RewardCollator", "pairwise_accuracy"]


@dataclass
class RewardConfig(RewardHeadConfig):
    """Configuration of `RewardTrainer` (field names follow TRL's RewardConfig where they overlap).

    Besides the shared head fields (`learning_rate`, `disable_dropout`, `init_score_head`, see
    `RewardHeadConfig`): `center_rewards_coefficient`. A dataset `margin` column turns on the Llama 2 margin.
    """

    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of the auxiliary centering loss coef * mean((r_chosen + r_rejected)^2) "
                  "(Eisenstein et al. 2023); None or 0: off. 0.01 is a usual value."},
    )
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": PAD_TO_MULTIPLE_HELP})

    def __post_init__(self) -> None:
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)
        super().__post_init__()


class RewardCollator:
    """Rows of `chosen_input_ids` / `rejected_input_ids` (and optional `margin`) -> one right-padded batch
    whose first half is every chosen sequence and second half every rejected one."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        input_ids, attention_mask = pad_right(seqs, self.pad_token_id)
        extra = -input_ids.shape[1] % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        if extra:
            input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([float(r["margin"]) for r in rows])
        return batch


def _check_margins(dataset: datasets.Dataset) -> None:
    for i, value in enumerate(dataset.with_format("arrow")["margin"].to_pylist()):
        _check_margin(i, value)


def _check_margin(index: int, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = "nothing (the field is missing)" if value is None else f"{type(value).__name__} {value!r}"
        raise DatasetFormatError(f"row {index}, field 'margin': expected a number, got {shown}")


class RewardTrainer(RewardHeadTrainer):
    """Trains an outcome reward model on preference data (explicit or implicit prompt, plain or
    conversational) with the Bradley-Terry loss, an optional `margin` column and reward centering."""

    accepted_formats: ClassVar = (DatasetKind.PREFERENCE,)
    config_class: ClassVar = RewardConfig
    model_task: ClassVar[str] = "seq-cls"
    num_labels: ClassVar[int] = 1
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    _tag_names: ClassVar = ["posttrain", "reward"]

    def __init__(
        self,
        model: ModelArg,
        args: RewardConfig | TrainingArguments | None = None,
        data_collator: CollatorArg = None,
        train_dataset: DatasetArg = None,
        eval_dataset: EvalDatasetArg = None,
        processing_class: ProcessingClassArg = None,
        compute_metrics: MetricsFn = None,
        callbacks: CallbacksArg = None,
        optimizers: OptimizersArg = (None, None),
        optimizer_cls_and_kwargs: OptimizerClsArg = None,
        preprocess_logits_for_metrics: LogitsFn = None,
        quantization_config: QuantizationArg = None,
        peft_config: PeftConfigArg = None,
    ) -> None:
        super(
            ).__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config, peft_config=peft_config)

    # ------------------------------------------------------------------------------------------ data
    def preprocess_dataset(self, dataset: datasets.Dataset, info: FormatInfo) -> datasets.Dataset:
        """Check an optional `margin` column (a number in every row) before anything is tokenized."""
        if "margin" in dataset.column_names:
            _check_margins(dataset)
        return dataset

    def stream_row_formatter(self, name: str) -> Any:
        """Streamed rows: the `margin` of every row that has the column is checked as it arrives."""
        def check(row: dict, index: int) -> dict:
            if "margin" in row:
                _check_margin(index, row["margin"])
            return row

        return check

    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        """One pair -> `chosen_input_ids`, `rejected_input_ids` (same encoding as the scorer), `truncated`."""
        if info.implicit_prompt:
            row = split_implicit_prompt(row)
        max_length = self.args.max_length
        tools = row.get("tools")
        chosen = encode_outcome(self.tokenizer, row["prompt"], row["chosen"], max_length=max_length, tools=tools)
        rejected = encode_outcome(self.tokenizer, row["prompt"], row["rejected"], max_length=max_length, tools=tools)
        out = {
            "chosen_input_ids": chosen["input_ids"],
            "rejected_input_ids": rejected["input_ids"],
            "truncated": chosen["truncated"] or rejected["truncated"],
        }
        if "margin" in row:
            out["margin"] = float(row["margin"])
        return out

    def make_collator(self) -> Any:
        """Chosen then rejected rows, right-padded with the pad id the head looks for."""
        return RewardCollator(self.tokenizer.pad_token_id, self.args.pad_to_multiple_of)

    # ------------------------------------------------------------------------------------------ loss
    def count_loss_items(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pairs: what the Bradley-Terry loss averages over."""
        return {"pairs": torch.tensor(batch["input_ids"].shape[0] // 2)}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Bradley-Terry loss (margin, centering) on the scores of one `[2B, L]` forward, chosen rows first;
        the mean is over the optimizer step's pairs."""
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
        chosen, rejected = rewards.float().chunk(2)
        loss, metrics = bradley_terry_loss(
            chosen, rejected, margin=inputs.get("margin"),
            center_rewards_coefficient=self.args.center_rewards_coefficient,
            num_pairs=self.loss_denominator(num_items_in_batch, "pairs", chosen.numel()),
        )
        self.store_metrics(metrics)
        if return_outputs:
            return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return loss

    def eval_predictions(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> tuple[Any, Any]:
        """`predictions [B, 2]`: each pair's chosen and rejected scores; `label_ids [B]`: 0, the column of the
        preferred completion (so `(predictions.argmax(1) == label_ids).mean()` is the pairwise accuracy)."""
        scores = torch.stack([outputs["rewards_chosen"], outputs["rewards_rejected"]], dim=1)
        return scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device)


def pairwise_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
) -> float:
    """Fraction of preference pairs in `dataset` whose chosen completion the model scores higher
    (ties count one half): the held-out accuracy of a reward model, over the whole dataset."""
    dataset = load_held_out(dataset)  # a folder or DatasetDict: its held-out split
    info = validate_dataset(dataset, [DatasetKind.PREFERENCE])
    rows = [split_implicit_prompt(r) if info.implicit_prompt else r for r in dataset]
    prompts = [r["prompt"] for r in rows]
    kw = dict(batch_size=batch_size, max_length=max_length)
    chosen = score_outcomes(model, tokenizer, prompts, [r["chosen"] for r in rows], **kw)
    rejected = score_outcomes(model, tokenizer, prompts, [r["rejected"] for r in rows], **kw)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    return sum(wins) / max(len(wins), 1)


register_method(
    "reward", RewardConfig, RewardTrainer,
    help="Outcome reward model: Bradley-Terry on preference pairs (optional margin column, reward centering).",
    trainer_kwargs=lambda script, *extras: {"peft_task_type": RewardTrainer.peft_task_type},
    task_format="preference",
)
