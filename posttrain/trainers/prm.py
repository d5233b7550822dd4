"""Process reward modeling: a 2-label token classifier that scores every step of a solution.

Stepwise data (`prompt`, `completions` = the steps, `labels` = one bool per step) is laid out as
``prompt + step_1 + sep + step_2 + sep + ...`` and the model is trained with a per-step binary
cross-entropy at the last token of each separator (every other position is ignored), as in Lightman et
al. 2023 ("Let's Verify Step by Step"). The loss lives in `posttrain.losses.prm`; the layout is shared with
the inference side (`posttrain.online.rewards.inputs`), where `score_steps` scores each step of a new
solution and `aggregate_step_scores` reduces the step scores to one trajectory score (min, product, last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ..data import DatasetKind, FormatInfo, PaddingCollator, load_any, load_held_out, validate_dataset
from ..data.streaming import is_stream
from ..losses.prm import IGNORE_INDEX, aggregate_step_scores, last_step_mask, prm_loss
from ..models import unwrap_model
from ..online.rewards.inputs import encode_steps
from ..online.rewards.reward_model import score_steps, score_steps_batch
from ._compat import (CallbacksArg, CollatorArg, DatasetArg, EvalDatasetArg, LogitsFn, MetricsFn, ModelArg, ModelInitArg,
                      OptimizerClsArg, OptimizersArg, PeftConfigArg, ProcessingClassArg, QuantizationArg)
from ._reward_base import RewardHeadConfig, RewardHeadTrainer
from .registry import register_method

__all__ = ["PRMConfig", "PRMTrainer", "aggregate_step_scores", "score_steps", "step_accuracy"]


@dataclass
class PRMConfig(RewardHeadConfig):
    """Configuration of `PRMTrainer` (field names follow TRL's PRMConfig where they overlap).

    Besides the shared head fields (`learning_rate`, `disable_dropout`, `init_score_head`, see
    `RewardHeadConfig`): `step_separator` and `train_on_last_step_only`.
    """

    step_separator: str = field(
        default="\n", metadata={"help": "Joins the steps; the score of a step is read at the separator after it."}
    )
    train_on_last_step_only: bool = field(
        default=False, metadata={"help": "Only the last step's label counts in the loss and the metrics."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW (TRL's default)."})
    max_completion_length: int | None = field(default=None, metadata={"help": (
        "Most tokens of the steps (everything after the prompt) a row keeps, cut before max_length (TRL's order); "
        "steps cut off lose their label, and rows left without a labelled step are dropped and counted.")})

    def __post_init__(self) -> None:
        if not self.step_separator:
            raise ValueError("step_separator must be a non-empty string")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length}: expected None or >= 1")
        super().__post_init__()


class PRMTrainer(RewardHeadTrainer):
    """Trains a process reward model on stepwise supervision data (plain or conversational prompt)."""

    accepted_formats: ClassVar = (DatasetKind.STEPWISE,)
    config_class: ClassVar = PRMConfig
    model_task: ClassVar[str] = "token-cls"
    num_labels: ClassVar[int] = 2
    peft_task_type: ClassVar[str] = "TOKEN_CLS"
    _tag_names: ClassVar = ["posttrain", "prm"]

    def __init__(
        self,
        model: ModelArg = None,
        args: PRMConfig | TrainingArguments | None = None,
        data_collator: CollatorArg = None,
        train_dataset: DatasetArg = None,
        eval_dataset: EvalDatasetArg = None,
        processing_class: ProcessingClassArg = None,
        model_init: ModelInitArg = None,
        compute_metrics: MetricsFn = None,
        callbacks: CallbacksArg = None,
        optimizers: OptimizersArg = (None, None),
        preprocess_logits_for_metrics: LogitsFn = None,
        peft_config: PeftConfigArg = None,
    ) -> None:
        super(
            ).__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
            compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics, peft_config=peft_config)

    def load_model(self, model: Any, args: PRMConfig) -> torch.nn.Module:
        """The token classifier, with `step_separator` recorded in its config: saved with the model, it is
        what `RewardModelScorer` splits steps at when the folder is used as a reward function."""
        model = super().load_model(model, args)
        unwrap_model(model).config.step_separator = args.step_separator
        return model

    # ------------------------------------------------------------------------------------------ data
    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        """One stepwise row -> `input_ids` and per-token `step_labels` (1/0 at separators, -100 elsewhere)."""
        args: PRMConfig = self.args
        out = encode_steps(
            self.tokenizer, row["prompt"], row["completions"], separator=args.step_separator,
            labels=row["labels"], max_length=args.max_length, max_completion_length=args.max_completion_length,
        )
        # Not named "labels": datasets.map would keep the input column's bool type for a same-named output.
        return {"input_ids": out["input_ids"], "step_labels": out["labels"], "truncated": out["truncated"]}

    def prepare_dataset(self, dataset: Any, name: str):
        """Tokenize, then drop (counted, reported) the rows truncation left without a labelled step."""
        tokenized = super().prepare_dataset(dataset, name)
        if is_stream(tokenized):
            return tokenized
        keep = [any(y != IGNORE_INDEX for y in labels)
                for labels in tokenized.with_format("arrow")["step_labels"].to_pylist()]
        return self.drop_rows_without_loss(tokenized, name, keep,
                                           "max_length / max_completion_length cut off every step's separator")

    def stream_options(self, info: FormatInfo, name: str) -> dict[str, Any]:
        return {"keep": lambda row: any(y != IGNORE_INDEX for y in row["step_labels"])}

    def make_collator(self) -> Any:
        """Right padding; `step_labels` pad with -100."""
        return PaddingCollator(pad_token_id=self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------ loss
    def _counted_steps(self, step_labels: torch.Tensor) -> torch.Tensor:
        if self.args.train_on_last_step_only:
            return last_step_mask(step_labels)
        return step_labels != IGNORE_INDEX

    def count_loss_items(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Labelled steps (the last of each row with `train_on_last_step_only`): what the loss averages over."""
        return {"steps": self._counted_steps(batch["step_labels"]).sum()}

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Per-step cross-entropy at the separator positions (`step_labels` != -100) of one forward, averaged
        over the optimizer step's labelled steps."""
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        steps = self.loss_denominator(num_items_in_batch, "steps", self._counted_steps(inputs["step_labels"]).sum())
        loss, metrics = prm_loss(logits.float(), inputs["step_labels"], self.args.train_on_last_step_only,
                                 num_steps=steps)
        self.store_metrics(metrics)
        return (loss, {"logits": logits}) if return_outputs else loss

    def eval_predictions(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> tuple[Any, Any]:
        """`predictions [B, L, 2]`: the token classifier's logits; `label_ids [B, L]`: the step labels (1/0 at
        each step's separator, -100 elsewhere), as a token-classification Trainer gives them."""
        return outputs["logits"].float(), inputs["step_labels"]


def step_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    separator: str = "\n",
    batch_size: int = 32,
    max_length: int | None = None,
    last_step_only: bool = False,
) -> dict[str, float]:
    """Step-level evaluation of a process reward model over a whole stepwise dataset.

    Returns ``step_accuracy`` (a step counts as predicted correct when its probability exceeds 0.5),
    ``majority_baseline`` (the accuracy of always predicting the more frequent label), ``positive_accuracy``
    and ``negative_accuracy`` (accuracy on steps labelled correct / incorrect) and ``num_steps``.
    """
    dataset = load_held_out(dataset)  # a folder or DatasetDict: its held-out split
    validate_dataset(dataset, [DatasetKind.STEPWISE])
    prompts, solutions, labels = dataset["prompt"], dataset["completions"], dataset["labels"]
    probs = score_steps_batch(model, tokenizer, prompts, solutions, separator=separator,
                              batch_size=batch_size, max_length=max_length)
    pairs = []
    for p, y in zip(probs, labels):
        scored = list(zip(p, y))  # truncation may leave fewer scores than labels
        pairs.extend(scored[-1:] if last_step_only else scored)
    if not pairs:
        raise ValueError("no step was scored (empty dataset, or max_length cut every step)")
    hits = [(prob > 0.5) == bool(y) for prob, y in pairs]
    pos = [h for h, (_, y) in zip(hits, pairs) if y]
    neg = [h for h, (_, y) in zip(hits, pairs) if not y]
    frac = len(pos) / len(pairs)
    return {
        "step_accuracy": sum(hits) / len(hits),
        "majority_baseline": max(frac, 1 - frac),
        "positive_accuracy": sum(pos) / len(pos) if pos else float("nan"),
        "negative_accuracy": sum(neg) / len(neg) if neg else float("nan"),
        "num_steps": float(len(pairs)),
    }


register_method(
    "prm", PRMConfig, PRMTrainer,
    help="Process reward model: per-step classification at step separators on stepwise data.",
    trainer_kwargs=lambda script, *extras: {"peft_task_type": PRMTrainer.peft_task_type},
    task_format="stepwise",
)
