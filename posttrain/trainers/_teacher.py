"""The teacher of the distillation methods: loaded, frozen, checked against the student's vocabulary.

A teacher is a model name, a folder, a ``tiny:<spec>`` or a loaded model. It is put in eval mode with
gradients off (it is never trained, and dropout would make its distributions noisy). Distillation compares
next-token distributions id by id, so the teacher must use the student's tokenizer; the two embedding
matrices may still differ in size (models pad them to a multiple of 64 or 128), and both distributions are
then taken over the ``min(V_S, V_T)`` ids they share (`posttrain.ops.shared_head`), which must cover every
id the tokenizer produces.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import load_model, load_tokenizer
from ..ops import output_head
from ._reference import shares_weights
from ._reward_heads import disable_dropout

__all__ = ["TeacherArgs", "attach_teacher", "load_teacher", "shared_vocab_size"]


@dataclass
class TeacherArgs:
    """The teacher fields of the distillation configs (TRL's names)."""

    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": (
        "The teacher: a hub name, a folder or tiny:<spec> (used when the trainer gets no teacher_model=).")})
    teacher_model_init_kwargs: dict | str | None = field(default=None, metadata={"help": (
        "Keyword arguments for loading the teacher from a name or path, as a dict or a JSON string (e.g. "
        "'{\"dtype\": \"bfloat16\"}').")})


def load_teacher(teacher: Any, student: torch.nn.Module, init_kwargs: dict[str, Any] | str | None = None) -> torch.nn.Module:
    """The teacher as a frozen module in eval mode (``teacher``: a name, folder, ``tiny:<spec>`` or a model)."""
    if isinstance(init_kwargs, str):
        try:
            init_kwargs = json.loads(init_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"teacher_model_init_kwargs must be a JSON object, got {init_kwargs!r}: {err}") from None
    if teacher is None:
        raise ValueError("distillation needs a teacher: pass teacher_model= (a model, a name, a folder or "
                         "tiny:<spec>) or set teacher_model_name_or_path in the config")
    if isinstance(teacher, (str, os.PathLike)):
        teacher = load_model(os.fspath(teacher), **dict(init_kwargs or {}))
    elif init_kwargs:
        raise ValueError("teacher_model_init_kwargs are given but the teacher is already a loaded model: drop "
                         "them, or pass the teacher as a name or path")
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher_model must be a model, a name or a path, got {type(teacher).__name__}")
    if shares_weights(student, teacher):
        raise ValueError("teacher_model is the student itself (or shares its weights): freezing the teacher would "
                         "freeze the student; pass a separate teacher model")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _vocab_name(tokenizer: Any, label: str) -> str:
    return f"{label} tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} ({len(tokenizer)} ids)"


def shared_vocab_size(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: Any,
                      teacher_tokenizer: Any = None) -> int:
    """The number of ids both distributions are compared over: ``min(V_S, V_T)`` of the two output heads.

    Raises ValueError when the teacher's own tokenizer (if known) maps any token differently from the
    student's, or when the shared ids do not cover the tokenizer, naming both vocabularies.
    """
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        student_vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        differ = sorted(t for t in set(student_vocab) | set(teacher_vocab)
                        if student_vocab.get(t) != teacher_vocab.get(t))[:5]
        raise ValueError(f"the teacher's vocabulary differs from the student's: {_vocab_name(tokenizer, 'student')} "
                         f"vs {_vocab_name(teacher_tokenizer, 'teacher')}; e.g. tokens {differ} have different ids. "
                         "Distillation compares next-token distributions id by id, so both models need the same "
                         "tokenizer")
    v_student, v_teacher = output_head(student)[0].shape[0], output_head(teacher)[0].shape[0]
    shared = min(v_student, v_teacher)
    if shared < len(tokenizer):
        raise ValueError(f"the student's head has {v_student} rows and the teacher's {v_teacher}, but "
                         f"{_vocab_name(tokenizer, 'the')} produces ids up to {len(tokenizer) - 1}: the models do "
                         "not share a vocabulary (a teacher with another tokenizer cannot be distilled id by id)")
    return shared


def teacher_tokenizer_of(teacher: Any) -> Any:
    """The tokenizer saved with a teacher given by name or folder (None for a loaded model or when absent)."""
    if not isinstance(teacher, (str, os.PathLike)):
        return None
    try:
        return load_tokenizer(os.fspath(teacher))
    except (OSError, ValueError):
        return None


def attach_teacher(trainer: Any, teacher_model: Any) -> None:
    """Give a trainer its teacher (``teacher_model``, else ``args.teacher_model_name_or_path``), frozen and on
    the trainer's device, as ``trainer.teacher`` (and TRL's ``trainer.teacher_model``), the shared vocabulary
    size as ``trainer.vocab_size``; turn off the student's dropout when ``args.disable_dropout``."""
    args = trainer.args
    spec = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    trainer.teacher = load_teacher(spec, trainer.model, args.teacher_model_init_kwargs).to(args.device)
    trainer.teacher_model = trainer.teacher
    trainer.vocab_size = shared_vocab_size(trainer.model, trainer.teacher, trainer.tokenizer, teacher_tokenizer_of(spec))
    if getattr(args, "disable_dropout", False):
        disable_dropout(trainer.model)
