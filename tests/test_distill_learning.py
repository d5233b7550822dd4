"""Slow learning tests: a tiny teacher trained on the built-in arithmetic task is distilled into a smaller
student (GKD, on-policy distillation, MiniLLM), which must get well above its starting held-out accuracy.

Held-out accuracy here is the student's next-token accuracy on the held-out problems' reference solutions
(teacher forcing, completion tokens only: the digits copied from the question, the column sums, carries,
the answer and the format), which moves within a test budget; exact-match answer accuracy needs hundreds
of steps on this model size. Purely on-policy methods start from the random student's own samples and
learn more slowly than GKD, which mixes in the dataset's completions; their bar is lower. The teacher (hidden 128, twice the student's) is
trained once by SFT and cached on disk for later runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.models import build_tiny
from posttrain.online.logprobs import completion_mask
from posttrain.ops import token_logps
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.distillation import DistillationConfig, DistillationTrainer
from posttrain.trainers.gkd import GKDConfig, GKDTrainer
from posttrain.trainers.minillm import MiniLLMConfig, MiniLLMTrainer
from posttrain.trainers.sft import SFTConfig, SFTTrainer

from _distill_helpers import base_args
from _online_helpers import _one_thread  # noqa: F401  (autouse)

pytestmark = pytest.mark.slow

TEACHER = "hidden=128,layers=2,heads=2"
TEACHER_SFT = dict(max_steps=150, learning_rate=3e-3, per_device_train_batch_size=32)
STEPS = 40


@pytest.fixture(scope="module")
def task_splits():
    return ArithmeticTask(digits=2, seed=0).split(2000, 48, "prompt_completion", "prompt_completion")


def held_out_token_accuracy(model, tok, test) -> float:
    """Greedy next-token accuracy on the held-out reference completions (one padding-free forward)."""
    from posttrain.data import tokenize_prompt_completion
    from posttrain.data.padding_free import padding_free_row

    pairs = [tokenize_prompt_completion(tok, r["prompt"], r["completion"]) for r in test]
    row = padding_free_row([p["prompt_ids"] for p in pairs], [p["completion_ids"] for p in pairs])
    was = model.training
    model.eval()
    with torch.no_grad():
        out = token_logps(model, row.input_ids, position_ids=row.position_ids, mask=row.completion_mask,
                          with_argmax=True)
    model.train(was)
    hit = (out.argmax == row.input_ids) & out.mask
    return float(hit.sum() / out.mask.sum())


@pytest.fixture(scope="module")
def teacher(task_splits):
    """The SFT-trained teacher (cached on disk by its settings) and its held-out token accuracy."""
    key = hashlib.sha256(repr((TEACHER, sorted(TEACHER_SFT.items()), 2000)).encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"posttrain-test-teacher-{key}")
    _, tok = build_tiny("nano")
    if not os.path.exists(os.path.join(folder, "config.json")):
        model, _ = build_tiny(TEACHER, seed=1)
        args = SFTConfig(**base_args(output_dir=folder + "-run", lr_scheduler_type="cosine", warmup_steps=0.05,
                                     logging_steps=50, padding_free=False, **TEACHER_SFT))
        SFTTrainer(model, args=args, train_dataset=task_splits["train"], processing_class=tok).train()
        model.save_pretrained(folder + ".tmp")
        os.replace(folder + ".tmp", folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, held_out_token_accuracy(model, tok, task_splits["test"])


def _run(make_trainer, task_splits, teacher_acc, name, min_gain=0.3):
    student, tok = build_tiny("nano")
    start = held_out_token_accuracy(student, tok, task_splits["test"])
    trainer = make_trainer(student, tok)
    trainer.train()
    end = held_out_token_accuracy(trainer.model, tok, task_splits["test"])
    print(f"{name}: held-out token accuracy {start:.3f} -> {end:.3f} in {STEPS} steps (teacher {teacher_acc:.3f})")
    assert teacher_acc > 0.75, teacher_acc
    assert end > start + min_gain, (start, end)
    return end


def test_gkd_student_learns_the_task_from_the_teacher(task_splits, teacher):
    model, acc = teacher

    def make(student, tok):
        args = GKDConfig(**base_args(max_steps=STEPS, per_device_train_batch_size=16, learning_rate=3e-3,
                                     max_new_tokens=48, lmbda=0.25, beta=0.5, logging_steps=STEPS))
        return GKDTrainer(student, model, args, train_dataset=task_splits["train"], processing_class=tok)

    _run(make, task_splits, acc, "GKD (lmbda=0.25, beta=0.5)")


def test_on_policy_distillation_student_learns_the_task(task_splits, teacher):
    model, acc = teacher

    def make(student, tok):
        args = DistillationConfig(**base_args(max_steps=STEPS, per_device_train_batch_size=16, learning_rate=3e-3,
                                              max_completion_length=48, logging_steps=STEPS))
        return DistillationTrainer(student, model, args, train_dataset=task_splits["train"], processing_class=tok)

    _run(make, task_splits, acc, "DistillationTrainer (on-policy, reverse KL)", min_gain=0.06)


def test_minillm_student_learns_the_task(task_splits, teacher):
    model, acc = teacher

    def make(student, tok):
        args = MiniLLMConfig(**base_args(max_steps=STEPS, per_device_train_batch_size=16, learning_rate=3e-3,
                                         num_generations=4, max_completion_length=48, logging_steps=STEPS,
                                         log_completions=False))
        return MiniLLMTrainer(student, model, args=args, train_dataset=task_splits["train"], processing_class=tok)

    _run(make, task_splits, acc, "MiniLLM (single-step reverse KL)", min_gain=0.05)
