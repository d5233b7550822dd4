"""Shared pieces of the distillation tests (GKD, on-policy distillation, MiniLLM)."""

from __future__ import annotations

import torch

from posttrain.models import build_tiny

TEACHER_SPEC = "nano,hidden=128,heads=2"  # twice as wide as the nano student


def base_args(**kw) -> dict:
    """Config fields of a few fast steps (no saving, no progress bars, no reports)."""
    base = dict(output_dir="/tmp/posttrain-test-distill", per_device_train_batch_size=8, max_steps=2,
                logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, learning_rate=1e-3,
                lr_scheduler_type="constant")
    base.update(kw)
    return base


def student_and_teacher(teacher_spec: str = TEACHER_SPEC):
    student, tok = build_tiny("nano")
    teacher, _ = build_tiny(teacher_spec, seed=1)
    return student, teacher, tok


def params_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}
