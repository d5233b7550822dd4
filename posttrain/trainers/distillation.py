"""On-policy distillation (TRL 1.16's stable `DistillationTrainer`): the student samples completions of the
prompts through the rollout engine (HF, vLLM colocated or the rollout server) and minimizes the generalized
JSD to the teacher on its own samples, ``beta = 1`` (reverse KL, mode seeking) by default (Agarwal et al.
2024, the GKD paper with ``lmbda = 1``; "on-policy distillation", Lu & Thinking Machines 2025).

Neither the student's nor the teacher's ``[B, L, V]`` logits are held: the divergence comes from hidden
states and each head in chunks, so ``use_fused_linear_loss`` is accepted and always in effect. ``temperature``
divides the logits for sampling and in the loss. The loop is `posttrain.trainers._distill`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ._distill import DistillTrainerBase, TeacherArgs
from ._online_config import OnlineConfig
from ._online_trl import OnlineTRLFields, OnlineTRLMixin
from .registry import register_method

__all__ = ["DistillationConfig", "DistillationTrainer"]


@dataclass
class DistillationConfig(TeacherArgs, OnlineTRLFields, OnlineConfig):
    """Configuration of `DistillationTrainer` (TRL 1.16's DistillationConfig fields and defaults)."""

    beta: float = field(default=1.0, metadata={"help": (
        "Generalized JSD interpolation: 0 forward KL, 0.5 JSD, 1 reverse KL (the default). Not a KL penalty to "
        "a reference model: there is none.")})
    max_completion_length: int | None = field(default=512, metadata={"help": "Most tokens generated per completion."})
    teacher_model_revision: str | None = field(default=None, metadata={"help": (
        "Revision (branch, tag, commit) of the teacher when loaded from the hub.")})
    disable_dropout: bool = field(default=False, metadata={"help": "Turn off dropout in the student."})
    use_fused_linear_loss: bool = field(default=False, metadata={"help": (
        "Accepted for TRL compatibility: the loss is always computed from hidden states and the heads in chunks.")})
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW."})
    log_completions: bool = field(default=False, metadata={"help": "Print and report a table of sample completions."})

    def __post_init__(self) -> None:
        self._resolve_online_trl_fields()
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0.0, 1.0], got {self.beta}")
        if self.teacher_model_revision is not None:
            self.teacher_model_init_kwargs = {**(self.teacher_model_init_kwargs or {}),
                                              "revision": self.teacher_model_revision}


class DistillationTrainer(OnlineTRLMixin, DistillTrainerBase):
    """On-policy distillation: ``DistillationTrainer(model, teacher_model, args, train_dataset, eval_dataset,
    processing_class, callbacks, optimizers, quantization_config, peft_config)`` as in TRL 1.16. Prompts only
    are read (a dataset's completions are ignored)."""

    config_class: ClassVar = DistillationConfig
    _tag_names: ClassVar = ["posttrain", "distillation"]

    def completion_source(self, rows: list[dict], mode: str, round_: int) -> str:
        return "student"


register_method(
    "distill", DistillationConfig, DistillationTrainer,
    help="On-policy distillation (TRL's DistillationTrainer): the model samples, and learns the teacher's "
         "(--teacher_model_name_or_path) distributions on its samples (generalized JSD, reverse KL by default).",
    task_format="prompt_only",
)
