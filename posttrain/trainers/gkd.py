"""GKD: generalized knowledge distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes").

Each generation's completions come, with probability ``lmbda``, from the student itself (on-policy, through
the rollout engine); otherwise from the teacher when ``seq_kd`` (sequence-level KD), else from the dataset.
The student then minimizes the generalized JSD (``beta``: 0 forward KL, 1 reverse KL) between its and the
teacher's next-token distributions on the completion tokens (`posttrain.trainers._distill`). Data:
prompt-completion rows or ``messages`` conversations (the last assistant turn is the completion); prompt-only
rows when every completion is generated (``lmbda=1`` or ``seq_kd``).

``temperature`` divides both models' logits in the loss as well as the sampler's (TRL's GKDTrainer applies
it to sampling only); ``max_new_tokens`` sets ``max_completion_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._distill import DistillTrainerBase, TeacherArgs
from ._online_config import OnlineConfig
from .registry import register_method

__all__ = ["GKDConfig", "GKDTrainer"]


@dataclass
class GKDConfig(TeacherArgs, OnlineConfig):
    """Configuration of `GKDTrainer` (TRL's GKDConfig fields and defaults)."""

    temperature: float = field(default=0.9, metadata={"help": (
        "Sampling temperature; also divides both models' logits in the divergence.")})
    lmbda: float = field(default=0.5, metadata={"help": (
        "Probability that a generation's completions are the student's own samples (on-policy).")})
    beta: float = field(default=0.5, metadata={"help": (
        "Generalized JSD interpolation: 0 forward KL(teacher || student), 1 reverse KL(student || teacher).")})
    max_new_tokens: int = field(default=128, metadata={"help": (
        "Most tokens generated per completion (sets max_completion_length; dataset completions are cut to it).")})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn off dropout in the student."})
    seq_kd: bool = field(default=False, metadata={"help": (
        "Sequence-level KD: when the student does not generate, the teacher does (instead of the dataset).")})
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW."})
    log_completions: bool = field(default=False, metadata={"help": "Print and report a table of sample completions."})

    def __post_init__(self) -> None:
        self.max_completion_length = self.max_new_tokens
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda={self.lmbda}: expected a probability in [0, 1]")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta={self.beta}: expected a value in [0, 1] (0 forward KL, 1 reverse KL)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: GKD samples and scales logits by it, expected > 0")


class GKDTrainer(DistillTrainerBase):
    """GKD: ``GKDTrainer(model, teacher_model, args, data_collator=None, train_dataset, eval_dataset,
    processing_class, compute_metrics=None, callbacks, optimizers, preprocess_logits_for_metrics=None,
    peft_config)`` as in TRL."""

    config_class: ClassVar = GKDConfig
    _tag_names: ClassVar = ["posttrain", "gkd"]

    def __init__(self, model: Any = None, teacher_model: Any = None, args: GKDConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), preprocess_logits_for_metrics: Any = None, peft_config: Any = None,
                 formatting_func: Any = None, **kwargs: Any) -> None:
        if formatting_func is not None:
            raise ValueError("GKDTrainer reads prompt-completion or 'messages' rows as they are: format the dataset "
                             "first (dataset.map) instead of passing formatting_func=")
        super().__init__(model, teacher_model, args, train_dataset, eval_dataset, processing_class, callbacks,
                         optimizers, peft_config=peft_config, data_collator=data_collator,
                         compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         **kwargs)
        a = self.args
        data = self.train_dataset
        if a.lmbda < 1.0 and not a.seq_kd and data is not None and "completion_ids" not in data.column_names:
            raise ValueError(f"GKD with lmbda={a.lmbda} and seq_kd=False trains on the dataset's completions in "
                             f"{1 - a.lmbda:.0%} of the generations, but the dataset has only prompts: give "
                             "prompt-completion or 'messages' data, set lmbda=1 (always on-policy) or seq_kd=True")

    def completion_source(self, rows: list[dict], mode: str, round_: int) -> str:
        if mode != "train":
            return "data" if self._has_completions(rows) else "student"
        if self._coin(round_) < self.args.lmbda:
            return "student"
        return "teacher" if self.args.seq_kd else "data"


register_method(
    "gkd", GKDConfig, GKDTrainer,
    help="GKD: distill a teacher (--teacher_model_name_or_path) into the model with the generalized JSD on a mix "
         "of on-policy, teacher and dataset completions.",
    task_format="prompt_completion",
)
