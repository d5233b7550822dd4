"""What `RewardTrainer` and `PRMTrainer` share: the config fields of a trainer that puts a classification
head on a backbone, and the trainer base class that loads the model with that head, initializes it, turns
dropout off and keeps the head trainable (and saved) under PEFT.

The subclasses only declare the head (`model_task`, `num_labels`, `peft_task_type`) and implement the data
layout (`tokenize_row`, `make_collator`) and the loss (`compute_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..models import load_model, unwrap_model
from ._loss_items import LossItemsMixin
from ._reward_heads import as_classifier, prepare_head
from .base import PostTrainConfig, PostTrainer

__all__ = ["RewardHeadConfig", "RewardHeadTrainer"]


@dataclass
class RewardHeadConfig(PostTrainConfig):
    """Fields shared by `RewardConfig` and `PRMConfig` (names follow TRL's where they overlap)."""

    learning_rate: float = field(
        default=1e-4, metadata={"help": "Peak learning rate of AdamW (the classification head starts from scratch)."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    init_score_head: bool | None = field(
        default=None,
        metadata={"help": "Initialize the classification head with N(0, 1/(hidden+1)). None: only when the "
                  "checkpoint has no trained head; True: always; False: never."},
    )

    def __post_init__(self) -> None:
        if self.padding_free:
            trainer = type(self).__name__.removesuffix("Config") + "Trainer"
            raise ValueError(f"padding_free is not supported by {trainer}: a classification head reads "
                             "per-row positions (the last token, or the step separators), so rows must be padded")
        super().__post_init__()


class RewardHeadTrainer(LossItemsMixin, PostTrainer):
    """Base of the reward-model trainers: a backbone with a `model_task` head of `num_labels` outputs.

    `model` may be a name or folder (loaded with the head; a checkpoint's own head is kept), a model object
    with the head already, or any causal LM object (rebuilt with a fresh head on the same backbone weights).
    The head is initialized N(0, 1/(hidden+1)) when new (seeded by `args.seed`), dropout is disabled, and a
    PEFT config gets the head added to `modules_to_save` so that LoRA trains and saves it. Losses are normalized
    by the optimizer step's item counts (`count_loss_items`: pairs, steps), so gradient accumulation does not
    change them.
    """

    model_task: ClassVar[str] = "seq-cls"
    num_labels: ClassVar[int] = 1
    peft_task_type: ClassVar[str] = "SEQ_CLS"

    def __init__(
        self,
        model: Any,
        args: RewardHeadConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model, args=args, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, peft_config=peft_config, **kwargs,
        )
        # A decoder head finds each row's last token through pad_token_id (rows are right-padded with it).
        unwrap_model(self.model).config.pad_token_id = self.tokenizer.pad_token_id

    def prepare_peft_config(self, model: torch.nn.Module, args: PostTrainConfig, peft_config: Any) -> Any:
        """The head's seeded init and dropout off, before PEFT; the PEFT config also trains and saves the head."""
        return prepare_head(model, args, peft_config, self.peft_task_type)

    def load_model(self, model: Any, args: PostTrainConfig) -> torch.nn.Module:
        """A name or path loads with the head; a model object is checked or given one (see `as_classifier`)."""
        if isinstance(model, str):
            model = load_model(model, task=self.model_task, num_labels=self.num_labels, **self.model_load_kwargs(args))
        return as_classifier(model, self.model_task, self.num_labels)
