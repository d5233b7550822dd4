"""GKDTrainer and DistillationTrainer: completion sources, the loss against full logits, the teacher, bad input."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain.losses.distill import generalized_jsd_loss
from posttrain.models import build_tiny, build_tokenizer
from posttrain.tasks import ArithmeticTask
from posttrain.trainers._teacher import shared_vocab_size
from posttrain.trainers.distillation import DistillationConfig, DistillationTrainer
from posttrain.trainers.gkd import GKDConfig, GKDTrainer

from _distill_helpers import TEACHER_SPEC, base_args, params_snapshot, student_and_teacher
from _online_helpers import _one_thread, history  # noqa: F401  (_one_thread: autouse)


def _gkd(data=None, teacher=None, **kw):
    student, default_teacher, tok = student_and_teacher()
    args = GKDConfig(**base_args(max_new_tokens=6, **kw))
    data = data if data is not None else ArithmeticTask(digits=2).prompt_completion(32)
    return GKDTrainer(student, teacher if teacher is not None else default_teacher, args, train_dataset=data,
                      processing_class=tok)


@pytest.mark.parametrize("lmbda,seq_kd,source", [(0.0, False, "data"), (1.0, False, "student"), (0.0, True, "teacher")])
def test_completion_sources_follow_lmbda_and_seq_kd(lmbda, seq_kd, source):
    trainer = _gkd(lmbda=lmbda, seq_kd=seq_kd, max_steps=3)
    seen = []
    original = trainer.prepare

    def spy(scored, mode):
        seen.append(scored.rollout)
        return original(scored, mode)

    trainer.prepare = spy
    trainer.train()
    assert history(trainer, "on_policy") == [float(source == "student")] * 3
    assert history(trainer, "teacher_generated") == [float(source == "teacher")] * 3
    by_prompt = {tuple(r["prompt_ids"]): r["completion_ids"] for r in trainer.train_dataset}
    from_data = [c == by_prompt[tuple(p)] for r in seen for p, c in zip(r.prompt_ids, r.completion_ids)]
    assert all(from_data) if source == "data" else not any(from_data)
    for key in ("loss", "divergence", "teacher_logps/mean", "student_logps/mean", "completions/mean_length"):
        assert key in trainer.state.log_history[0], key


def test_lmbda_mixes_sources_at_its_rate():
    trainer = _gkd(lmbda=0.5)
    draws = [trainer.completion_source([], "train", r) for r in range(400)]
    assert 0.4 < draws.count("student") / 400 < 0.6 and set(draws) == {"student", "data"}
    assert draws == [trainer.completion_source([], "train", r) for r in range(400)]  # seeded


def test_loss_is_the_generalized_jsd_of_the_full_logits():
    """The trainer's loss on a batch equals TRL-style generalized JSD computed from both models' full logits."""
    trainer = _gkd(lmbda=0.0, beta=0.3, temperature=0.7)
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.prepare(trainer.score(rows, trainer.rollout(rows, "train"), "train"), "train")
    loss = trainer.compute_loss(trainer.model, batch)
    values = []
    for p, c in zip(batch.prompt_ids, batch.completion_ids):
        ids = torch.tensor([p + c])
        zs, zt = trainer.model(input_ids=ids).logits, trainer.teacher(input_ids=ids).logits
        labels = ids.clone()
        labels[:, : len(p)] = -100
        values.append(generalized_jsd_loss(zs[:, :-1], zt[:, :-1], labels[:, 1:], beta=0.3, temperature=0.7,
                                           reduction="sum"))
    torch.testing.assert_close(loss, sum(values) / sum(len(c) for c in batch.completion_ids), rtol=1e-4, atol=1e-6)


def test_teacher_is_frozen_and_student_moves():
    trainer = _gkd(lmbda=0.5)
    before_t, before_s = params_snapshot(trainer.teacher), params_snapshot(trainer.model)
    trainer.train()
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(before_t[k], v) for k, v in trainer.teacher.named_parameters())
    assert any(not torch.equal(before_s[k], v) for k, v in trainer.model.named_parameters())


def test_messages_data_distills_the_last_assistant_turn():
    data = ArithmeticTask(digits=2, conversational=True).prompt_completion(16).to_list()
    messages = Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in data])
    trainer = _gkd(messages, lmbda=0.0)
    first = trainer.train_dataset[0]
    assert first["prompt"][-1]["role"] == "user" and first["completion"][0]["role"] == "assistant"
    trainer.train()
    assert history(trainer, "on_policy") == [0.0, 0.0]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="row 1: .*must end with an assistant turn"):
        _gkd(Dataset.from_list([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                                {"messages": [{"role": "user", "content": "only a question"}]}]))
    with pytest.raises(ValueError, match="dataset has only prompts"):
        _gkd(ArithmeticTask(digits=2).prompt_only(16), lmbda=0.5)
    with pytest.raises(ValueError, match="needs a teacher"):
        GKDTrainer("tiny:nano", None, GKDConfig(**base_args()), train_dataset=ArithmeticTask(digits=2).prompt_completion(8))
    with pytest.raises(ValueError, match="lmbda"):
        GKDConfig(**base_args(lmbda=1.5))


def test_vocabularies_padded_or_different():
    """A teacher whose embedding is padded past the tokenizer trains over the shared ids; a teacher whose
    tokenizer maps tokens differently is refused with both vocabularies named."""
    student, tok = build_tiny("nano")
    padded, _ = build_tiny(f"{TEACHER_SPEC},vocab={len(tok) + 64}", seed=1)
    trainer = _gkd(teacher=padded, lmbda=0.5)
    assert trainer.vocab_size == len(tok) < padded.lm_head.weight.shape[0]
    trainer.train()
    assert all(torch.isfinite(torch.tensor(history(trainer, "loss"))))
    other = build_tokenizer(vocab_size=1024)
    with pytest.raises(ValueError, match=r"student tokenizer .*\(\d+ ids\) vs teacher tokenizer .*\(\d+ ids\)"):
        shared_vocab_size(student, padded, tok, other)


def test_distillation_trainer_is_on_policy_reverse_kl_by_default():
    args = DistillationConfig(**base_args(max_completion_length=6))
    assert (args.beta, args.temperature, args.num_generations, DistillationConfig().max_completion_length) == (1.0, 1.0, 1, 512)
    trainer = DistillationTrainer("tiny:nano", f"tiny:{TEACHER_SPEC}", args,
                                  train_dataset=ArithmeticTask(digits=2).prompt_only(16))
    trainer.train()
    assert history(trainer, "on_policy") == [1.0, 1.0]
    assert all(v > 0 for v in history(trainer, "divergence"))


def test_peft_student_trains_adapters_only():
    from peft import LoraConfig

    student, teacher, tok = student_and_teacher()
    args = GKDConfig(**base_args(max_new_tokens=6, lmbda=0.5))
    trainer = GKDTrainer(student, teacher, args, train_dataset=ArithmeticTask(digits=2).prompt_completion(16),
                         processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = params_snapshot(trainer.model)
    trainer.train()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)


# ------------------------------------------------------------- TRL's SFTConfig fields on GKDConfig
def test_sft_data_fields_have_trls_defaults_and_meaning_in_gkd(caplog):
    convo = [{"role": "user", "content": "What is 2+2? Answer with a number and a long tail of words"},
             {"role": "assistant", "content": "4"}]
    data = Dataset.from_list([{"chat": convo}] * 8)
    trainer = _gkd(data=data, dataset_text_field="chat", max_prompt_length=4)
    row = trainer.train_dataset[0]
    from posttrain.data import tokenize_prompt_completion

    full = tokenize_prompt_completion(trainer.tokenizer, convo[:1], convo[1:])["prompt_ids"]
    assert len(full) > 4
    assert row["prompt_truncated"] and row["prompt_ids"] == list(full[:4])  # keep_start: TRL's default
    keep_end = _gkd(data=data, dataset_text_field="chat", max_prompt_length=4, truncation_mode="keep_end")
    assert keep_end.train_dataset[0]["prompt_ids"] == list(full[-4:])
    numbered = ArithmeticTask(digits=2).prompt_completion(16)
    plain = _gkd(data=numbered)
    shuffled = _gkd(data=numbered, shuffle_dataset=True)
    assert plain.train_dataset["prompt"] == numbered["prompt"]  # shuffle_dataset=False (TRL): kept in order
    assert shuffled.train_dataset["prompt"] != numbered["prompt"]
    assert sorted(shuffled.train_dataset["prompt"]) == sorted(numbered["prompt"])
    with pytest.raises(ValueError, match="completion_only_loss=False"):
        GKDConfig(**base_args(completion_only_loss=False))
    with pytest.raises(ValueError, match="truncation_mode"):
        GKDConfig(**base_args(truncation_mode="middle"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        _gkd(packing=True, loss_type="dft", pad_to_multiple_of=8, completion_only_loss=True,
             assistant_only_loss=True)
    text = [r.getMessage() for r in caplog.records]
    for name in ("packing=True", "loss_type='dft'", "pad_to_multiple_of=8"):
        assert sum(name in t for t in text) == 1, (name, text)
    assert not any("completion_only_loss" in t or "assistant_only_loss" in t for t in text)  # what GKD does
