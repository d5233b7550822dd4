"""MiniLLMTrainer: the seed's snippet, the teacher reward of the score stage, the single-step term, extra rewards."""

from __future__ import annotations

import pytest
import torch

from posttrain.losses.distill import generalized_jsd_loss
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.minillm import MiniLLMConfig, MiniLLMTrainer

from _distill_helpers import TEACHER_SPEC, base_args, student_and_teacher
from _online_helpers import _one_thread, digit_share, history  # noqa: F401  (_one_thread: autouse)


def _args(**kw):
    return MiniLLMConfig(**base_args(num_generations=4, max_completion_length=6, log_completions=False, **kw))


def test_seed_snippet_runs_with_the_import_changed():
    """`MiniLLMTrainer(model=..., teacher_model=..., train_dataset=...)` as in the seed (names instead of hub
    models); its default config builds, and a short run with it trains."""
    data = ArithmeticTask(digits=2).prompt_only(16)
    trainer = MiniLLMTrainer(model="tiny:nano", teacher_model=f"tiny:{TEACHER_SPEC}", train_dataset=data)
    assert isinstance(trainer.args, MiniLLMConfig) and trainer.args.single_step_decomposition
    assert not trainer.teacher.training
    trainer = MiniLLMTrainer(model="tiny:nano", teacher_model=f"tiny:{TEACHER_SPEC}", train_dataset=data, args=_args())
    trainer.train()
    for key in ("loss", "single_step_kl", "pg_loss", "rkl_reward", "teacher_logps/mean", "student_logps/mean",
                "completions/mean_length"):
        assert key in trainer.state.log_history[0], key


def _scored(trainer, n_prompts=2):
    rows = [trainer.train_dataset[i] for i in range(n_prompts)]
    return trainer.score(rows, trainer.rollout(rows, "train"), "train")


def test_teacher_log_probs_are_the_score_stage_tensor_reward():
    student, teacher, tok = student_and_teacher()
    trainer = MiniLLMTrainer(student, teacher, args=_args(kd_temperature=1.7),
                             train_dataset=ArithmeticTask(digits=2).prompt_only(8), processing_class=tok)
    scored = _scored(trainer)
    got = scored.scores["teacher_logps"]
    for j, (p, c) in enumerate(zip(scored.rollout.prompt_ids, scored.rollout.completion_ids)):
        logits = teacher(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1] / 1.7
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(got[j, : len(c)], want, atol=1e-5, rtol=1e-5)


def test_single_step_term_is_the_full_logits_reverse_kl():
    student, teacher, tok = student_and_teacher()
    trainer = MiniLLMTrainer(student, teacher, args=_args(), train_dataset=ArithmeticTask(digits=2).prompt_only(8),
                             processing_class=tok)
    trainer.model.train()
    batch = trainer.prepare(_scored(trainer), "train")
    trainer.compute_loss(trainer.model, batch)
    got = trainer._metrics["train"]["single_step_kl"][-1]
    values, count = 0.0, 0
    torch.set_grad_enabled(False)
    for p, c in zip(batch.prompt_ids, batch.completion_ids):
        ids = torch.tensor([p + c])
        labels = ids.clone()
        labels[:, : len(p)] = -100
        values += float(generalized_jsd_loss(student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1],
                                             labels[:, 1:], beta=1.0, reduction="sum"))
        count += len(c)
    torch.set_grad_enabled(True)
    assert got == pytest.approx(values / count, rel=1e-4)
    assert batch.advantages.shape == batch.completion_mask.shape  # per-token advantages


def test_extra_rewards_enter_the_advantages():
    student, teacher, tok = student_and_teacher()
    args = _args(gamma=1.0, single_step_decomposition=False)
    data = ArithmeticTask(digits=2).prompt_only(8)
    plain = MiniLLMTrainer(student, teacher, args=args, train_dataset=data, processing_class=tok)
    with_reward = MiniLLMTrainer(student, teacher, args=args, train_dataset=data, processing_class=tok,
                                 reward_funcs=digit_share)
    a = plain.prepare(_scored(plain), "train")
    b = with_reward.prepare(_scored(with_reward), "train")
    assert a.completion_ids == b.completion_ids  # same seeds, same samples
    seq = (b.advantages - a.advantages)[:, 0]
    rewards = torch.tensor(digit_share(None, [plain.tokenizer.decode(c, skip_special_tokens=True) for c in a.completion_ids]))
    centred = rewards.view(-1, 4) - rewards.view(-1, 4).mean(1, keepdim=True)
    std = rewards.view(-1, 4).std(1, keepdim=True)
    torch.testing.assert_close(seq.view(-1, 4), centred / (std + 1e-4), atol=1e-4, rtol=1e-4)
    # and within a group the teacher part of the advantages sums to 0 over its tokens (the group baseline)
    mask = a.completion_mask
    assert ((a.advantages * mask).view(-1, 4, mask.shape[1]).sum((1, 2)).abs() < 1e-4).all()


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="reference"):
        _args(beta=0.1)
    with pytest.raises(ValueError, match="gamma"):
        _args(gamma=2.0)


def test_rkl_advantage_false_trains_on_the_rewards_advantage_alone():
    student, teacher, tok = student_and_teacher()
    data = ArithmeticTask(digits=2).prompt_only(8)
    trainer = MiniLLMTrainer(student, teacher, args=_args(rkl_advantage=False), train_dataset=data,
                             processing_class=tok, reward_funcs=digit_share)
    batch = trainer.prepare(_scored(trainer), "train")
    mask = batch.completion_mask
    # constant along each completion (the sequence reward's advantage), no per-token reverse-KL returns
    first = batch.advantages[:, :1].expand_as(batch.advantages)
    torch.testing.assert_close(batch.advantages * mask, first * mask)
    with pytest.raises(ValueError, match="nothing to learn"):
        MiniLLMTrainer(student, teacher, args=_args(rkl_advantage=False, single_step_decomposition=False),
                       train_dataset=data, processing_class=tok)
