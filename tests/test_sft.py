"""SFT behaviour a user relies on: it learns, padding-free/packed batches change nothing, LoRA trains only the
adapter, checkpoints resume exactly, bad rows fail before training, metrics reach the logs."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

from posttrain import SFTConfig, SFTTrainer
from posttrain.data import DatasetFormatError
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask


def _config(tmp_path, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, per_device_eval_batch_size=64,
                learning_rate=3e-3, logging_steps=5, save_strategy="no", report_to="none", seed=0,
                disable_tqdm=True, max_length=128)
    base.update(kw)
    return SFTConfig(**base)


@pytest.fixture(scope="module")
def task_data():
    splits = ArithmeticTask(digits=2, seed=0).split(256, 64, "prompt_completion", "prompt_completion")
    return splits["train"], splits["test"]


def test_sft_loss_decreases_on_task(tmp_path, task_data):
    train, test = task_data
    model, tok = build_tiny("nano", seed=0)
    trainer = SFTTrainer(model=model, args=_config(tmp_path, max_steps=30), train_dataset=train,
                         eval_dataset=test, processing_class=tok)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.6 * before
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert "mean_token_accuracy" in logs[-1] and 0.0 <= logs[-1]["mean_token_accuracy"] <= 1.0
    assert logs[-1]["num_tokens"] > logs[0]["num_tokens"] > 0
    assert after["eval_mean_token_accuracy"] > 0.3
    assert os.path.exists(tmp_path / "out" / "loss_curve.png")


def test_spare_log_softmax_buffer_lives_only_while_training(tmp_path, task_data):
    from transformers import TrainerCallback

    from posttrain.ops import logprobs

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            seen.append(len(logprobs._spare_probs))

    model, tok = build_tiny("nano", seed=0)
    trainer = SFTTrainer(model=model, args=_config(tmp_path, max_steps=3), train_dataset=task_data[0],
                         processing_class=tok, callbacks=[Probe()])
    trainer.train()
    assert seen == [1, 1, 1]  # each backward handed its probability buffer back for the next step
    assert not logprobs._spare_probs


def test_dft_variant_learns(tmp_path, task_data):
    train, test = task_data
    model, tok = build_tiny("nano", seed=0)
    trainer = SFTTrainer(model=model, args=_config(tmp_path, max_steps=30, loss_type="dft"), train_dataset=train,
                         eval_dataset=test, processing_class=tok)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    # The DFT objective itself grows as probabilities do; the likelihood it optimizes must improve.
    assert after["eval_nll"] < 0.8 * before["eval_nll"]
    assert after["eval_mean_token_accuracy"] > before["eval_mean_token_accuracy"]


@pytest.mark.parametrize("mode", ["padding_free", "packing"])
def test_padding_free_and_packing_give_the_padded_loss(tmp_path, task_data, mode):
    """One eval batch holds the whole set, so the token-mean loss must match the padded run exactly."""
    _, test = task_data
    model, tok = build_tiny("nano", seed=0)
    padded = SFTTrainer(model=model, args=_config(tmp_path, padding_free=False), eval_dataset=test,
                        processing_class=tok).evaluate()
    kw = {"padding_free": True} if mode == "padding_free" else {"packing": True, "max_length": 256}
    other = SFTTrainer(model=model, args=_config(tmp_path, **kw), eval_dataset=test, processing_class=tok).evaluate()
    assert other["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
    assert other["eval_mean_token_accuracy"] == pytest.approx(padded["eval_mean_token_accuracy"], rel=1e-6)


def test_conversational_data_trains_on_assistant_turns(tmp_path):
    train = ArithmeticTask(digits=2, seed=0, conversational=True).language_modeling(64)
    model, tok = build_tiny("nano", seed=0)
    trainer = SFTTrainer(model=model, args=_config(tmp_path, max_steps=4, assistant_only_loss=True),
                         train_dataset=train, processing_class=tok)
    row = trainer.train_dataset[0]
    masked = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert 0 < len(masked) < len(row["input_ids"])
    assert "<answer>" in tok.decode(masked)
    assert "user" not in tok.decode(masked)
    trainer.train()


def test_conversations_train_on_every_token_by_default_as_in_trl(tmp_path):
    """TRL's default assistant_only_loss=False: the loss covers the whole conversation, user turns included."""
    assert SFTConfig(output_dir=str(tmp_path)).assistant_only_loss is False
    train = ArithmeticTask(digits=2, seed=0, conversational=True).language_modeling(4)
    model, tok = build_tiny("nano", seed=0)
    trainer = SFTTrainer(model=model, args=_config(tmp_path), train_dataset=train, processing_class=tok)
    for row in trainer.train_dataset:
        assert all(row["completion_mask"]) and len(row["completion_mask"]) == len(row["input_ids"])


def test_lora_trains_only_adapter_and_merges(tmp_path, task_data):
    from peft import LoraConfig

    train, _ = task_data
    model, tok = build_tiny("nano", seed=0)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SFTTrainer(model=model, args=_config(tmp_path, max_steps=10), train_dataset=train, processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(p, lora_before[name]), name
        elif "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base_before[key]), name
    trainer.save_model(str(tmp_path / "adapter"))
    files = os.listdir(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    merged_dir = trainer.save_merged_model(str(tmp_path / "merged"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([tok("What is 12 + 34?")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trainer.model(input_ids=ids).logits, atol=1e-4)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, task_data):
    train, _ = task_data
    cfg = dict(max_steps=6, save_strategy="steps", save_steps=3)
    model, tok = build_tiny("nano", seed=0)
    straight = SFTTrainer(model=model, args=_config(tmp_path / "a", **cfg), train_dataset=train, processing_class=tok)
    straight.train()
    from transformers import TrainerCallback

    class StopAfter3(TrainerCallback):  # the same run, killed after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3

    model, tok = build_tiny("nano", seed=0)
    interrupted = SFTTrainer(model=model, args=_config(tmp_path / "b", **cfg), train_dataset=train,
                             processing_class=tok, callbacks=[StopAfter3()])
    interrupted.train()
    assert interrupted.state.global_step == 3
    model, tok = build_tiny("nano", seed=0)
    resumed = SFTTrainer(model=model, args=_config(tmp_path / "b", **cfg), train_dataset=train, processing_class=tok)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_bad_row_fails_before_training(tmp_path):
    data = Dataset.from_list([{"prompt": "1+1?", "completion": "2"}, {"prompt": "2+2?", "completion": None}])
    model, tok = build_tiny("nano", seed=0)
    with pytest.raises(DatasetFormatError) as err:
        SFTTrainer(model=model, args=_config(tmp_path), train_dataset=data, processing_class=tok)
    assert "row 1" in str(err.value) and "completion" in str(err.value)


def test_model_by_name_and_truncation_is_reported(tmp_path, caplog):
    data = Dataset.from_list([{"text": "word " * 300}, {"text": "short text"}])
    trainer = SFTTrainer(model="tiny:nano", args=_config(tmp_path, max_length=64, max_steps=1), train_dataset=data)
    assert max(len(r["input_ids"]) for r in trainer.train_dataset) == 64
    assert trainer._totals["data/train/truncated_rows"] == 1
    trainer.train()
