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

TRL's GKDConfig subclasses SFTConfig, so it carries SFT's data fields (`posttrain.trainers._trl_fields.
SFTDataFields`, TRL's defaults). Here:

- ``dataset_text_field``: the column holding each row's conversation, read as ``messages``;
- ``truncation_mode``: which end of a prompt longer than ``max_prompt_length`` is kept (``keep_start``, TRL's
  default: the first tokens; ``keep_end``: the last);
- ``shuffle_dataset``: shuffle the prepared prompts once (seeded) before training; the prompt order of each
  epoch is a seeded shuffle either way (as TRL's sampler's is);
- ``completion_only_loss`` (None or True) and ``assistant_only_loss``: the divergence is always taken on the
  completion tokens only (a conversation's final assistant turn); ``completion_only_loss=False`` is an error;
- ``packing``, ``eval_packing``, ``packing_strategy``, ``loss_type`` and ``dataset_kwargs`` mean nothing for
  on-policy distillation (completions are generated per batch; the loss is the generalized JSD): accepted,
  warned once when set; ``pad_to_multiple_of`` likewise (rollout batches are padded to their longest row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..data import TokenizedStream, is_stream, load_any, load_held_out
from ..online.pipeline import PromptStream
from ._distill import DistillTrainerBase, TeacherArgs
from ._online_config import OnlineConfig
from ._online_trl import warn_pad_to_multiple_of
from ._trl_fields import SFTDataFields, rename_text_field
from .registry import register_method

__all__ = ["GKDConfig", "GKDTrainer"]


@dataclass
class GKDConfig(SFTDataFields, TeacherArgs, OnlineConfig):
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
        self.resolve_sft_data_fields()
        if self.completion_only_loss is False:
            raise ValueError("completion_only_loss=False: GKD's divergence is taken on the completion tokens (the "
                             "ones the student, the teacher or the dataset wrote), never on the prompt; drop it")
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
    inapplicable_fields: ClassVar[dict[str, str]] = {
        **DistillTrainerBase.inapplicable_fields,
        "packing": "completions are generated per batch (on-policy): there are no fixed rows to pack",
        "eval_packing": "completions are generated per batch (on-policy): there are no fixed rows to pack",
        "packing_strategy": "completions are generated per batch (on-policy): there are no fixed rows to pack",
        "loss_type": "GKD's loss is the generalized JSD (beta), not SFT's nll/dft",
        "dataset_kwargs": "GKD tokenizes prompts (and dataset completions) itself: the rollout engine needs them",
    }

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
        warn_pad_to_multiple_of(type(self).__name__, self.args.pad_to_multiple_of)
        a = self.args
        data = self.train_dataset
        if a.lmbda < 1.0 and not a.seq_kd and data is not None and "completion_ids" not in data.column_names:
            raise ValueError(f"GKD with lmbda={a.lmbda} and seq_kd=False trains on the dataset's completions in "
                             f"{1 - a.lmbda:.0%} of the generations, but the dataset has only prompts: give "
                             "prompt-completion or 'messages' data, set lmbda=1 (always on-policy) or seq_kd=True")

    def prepare_dataset(self, dataset: Any, name: str) -> Any:
        """SFT's ``dataset_text_field`` (the conversation column) and ``shuffle_dataset`` (one seeded shuffle of
        the training prompts), around the distillation data pipeline."""
        if dataset is None or is_stream(dataset) or isinstance(dataset, TokenizedStream):
            return super().prepare_dataset(dataset, name)
        if self.args.dataset_text_field not in ("text", "messages"):
            dataset = load_held_out(dataset) if name.startswith("eval") else load_any(dataset)
            dataset = rename_text_field(dataset, self.args.dataset_text_field, name)
        prepared = super().prepare_dataset(dataset, name)
        if name == "train" and self.args.shuffle_dataset:
            prepared = prepared.shuffle(seed=self.args.seed)
        return prepared

    def prompt_source(self) -> Any:
        """The online loop's prompt stream, always a seeded shuffle per epoch (TRL's GKD samples its batches at
        random; its ``shuffle_dataset`` defaults to False and only adds the one-off shuffle above)."""
        args = self.args
        if isinstance(self.train_dataset, TokenizedStream):
            return super().prompt_source()
        return PromptStream(self.train_dataset, args.prompts_per_generation, args.world_size, args.process_index,
                            seed=args.seed, shuffle=True)

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
