"""Streaming datasets (`IterableDataset`): the same tokenized rows as the in-memory path, row-by-row validation
that stops training before a bad row is trained on, bounded packing, max_steps required, and resume."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, IterableDataset

import posttrain as pt
from posttrain.data import DatasetFormatError
from posttrain.tasks import ArithmeticTask

from _data_helpers import trainer_case
from _online_helpers import _one_thread  # noqa: F401  (autouse)

CONV = ArithmeticTask(digits=2, conversational=True)
PLAIN = ArithmeticTask(digits=2)


def _args(config_cls, tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, max_steps=2, report_to="none", save_strategy="no",
                disable_tqdm=True, logging_steps=1, max_length=60, lr_scheduler_type="constant")
    base.update(kw)
    return config_cls(**base)


STREAMED = ["sft", "sft_packed", "sft_text_field", "dpo", "dpo_implicit", "kto", "kto_from_pairs", "reward", "prm"]


@pytest.mark.parametrize("method", STREAMED)
def test_a_stream_tokenizes_to_the_same_rows_and_counts_as_the_dataset(method, tmp_path):
    trainer_cls, config_cls, extra, data = trainer_case(method, 12)
    memory = trainer_cls(model="tiny:nano", args=_args(config_cls, tmp_path, **extra), train_dataset=data)
    streamed = trainer_cls(model="tiny:nano", args=_args(config_cls, tmp_path, **extra),
                           train_dataset=data.to_iterable_dataset())
    rows = list(streamed.train_dataset)
    assert rows == memory.train_dataset.to_list()
    assert {k: v for k, v in streamed._totals.items() if v} == {k: v for k, v in memory._totals.items() if v}


@pytest.mark.parametrize("method", ["sft", "dpo", "reward"])
def test_a_bad_row_in_a_stream_stops_training_before_it_is_trained_on(method, tmp_path):
    trainer_cls, config_cls, extra, data = trainer_case(method, 12)
    rows = data.to_list()
    field = "completion" if method == "sft" else "rejected"
    rows[5][field] = None  # in the second batch of 4
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = trainer_cls(model="tiny:nano", args=_args(config_cls, tmp_path, max_steps=3, **extra),
                          train_dataset=stream)
    with pytest.raises(DatasetFormatError, match=f"row 5, field '{field}'"):
        trainer.train()
    # the batch holding row 5 (the second) never trained; the first may not have either, as the data loader
    # reads one batch ahead
    assert trainer.state.global_step < 2


def test_a_bad_first_row_and_a_stream_without_max_steps_fail_before_training(tmp_path):
    rows = PLAIN.prompt_completion(4).to_list()
    with pytest.raises(ValueError, match="set max_steps"):
        pt.SFTTrainer("tiny:nano", _args(pt.SFTConfig, tmp_path, max_steps=-1),
                      train_dataset=Dataset.from_list(rows).to_iterable_dataset())
    rows[0]["prompt"] = 3
    with pytest.raises(DatasetFormatError, match="row 0, field 'prompt'"):
        pt.SFTTrainer("tiny:nano", _args(pt.SFTConfig, tmp_path),
                      train_dataset=IterableDataset.from_generator(lambda: iter(rows)))


def test_streamed_packing_reads_a_bounded_buffer(tmp_path):
    """The first packed batch is ready after at most `pack_buffer` rows have been read from the source."""
    reads = []
    source_rows = PLAIN.language_modeling(40).to_list()

    class Source(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i, row in enumerate(source_rows):
                reads.append(i)
                yield row

    trainer = pt.SFTTrainer("tiny:nano", _args(pt.SFTConfig, tmp_path, packing=True, max_length=200),
                            train_dataset=Source())
    trainer.train_dataset.pack_buffer = 8
    reads.clear()
    first = next(iter(trainer.train_dataset))
    assert len(reads) <= 9  # the buffer, plus the one row that shows it is full
    assert len(first["input_ids"]) <= 200 and sum(first["seq_lens"]) == len(first["input_ids"]) and len(first["seq_lens"]) > 1


def _losses(trainer):
    return [round(h["loss"], 6) for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow  # three short runs and a checkpoint: ~12 s each
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_streamed_training_resumes_where_it_stopped(method, tmp_path):
    """4 steps in one go, and 2 steps + a resumed run of 2 more, log the same losses: the resumed run skipped
    exactly the rows the first one consumed."""
    trainer_cls, config_cls, extra, _ = trainer_case(method)
    data = (CONV.prompt_completion(24) if method == "sft" else CONV.preference(24)).to_iterable_dataset()
    kw = dict(max_steps=4, learning_rate=1e-2, **extra)
    whole = trainer_cls(model="tiny:nano", args=_args(config_cls, tmp_path / "whole", **kw), train_dataset=data)
    whole.train()
    first = trainer_cls(model="tiny:nano", args=_args(config_cls, tmp_path / "parts", save_strategy="steps",
                                                      save_steps=2, **kw), train_dataset=data)
    first.train()
    resumed = trainer_cls(model="tiny:nano", args=_args(config_cls, tmp_path / "parts", **kw), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    assert len(set(_losses(whole))) == 4  # the loss moves: equal logs below are not a coincidence
    assert _losses(resumed)[-2:] == pytest.approx(_losses(whole)[2:], abs=1e-5)


class _PromptLog:
    """A reward function (the completion's length) that records the prompts it scores, one list per call."""

    __name__ = "length"

    def __init__(self):
        self.prompts = []

    def __call__(self, prompts, completions, **kwargs):
        self.prompts.append([p[-1]["content"] for p in prompts])
        return [len(c[0]["content"]) / 10 for c in completions]


def _grpo(tmp, reward, **kw):
    args = _args(pt.GRPOConfig, tmp, num_generations=2, max_completion_length=4, log_completions=False,
                 max_length=None, learning_rate=1e-2, **kw)
    return pt.GRPOTrainer("tiny:nano", reward, args, train_dataset=CONV.prompt_only(40).to_iterable_dataset())


@pytest.mark.slow  # three short GRPO runs and a checkpoint: ~20 s
def test_streamed_grpo_trains_and_resumes_with_the_prompts_it_had_not_drawn(tmp_path):
    whole_log, first_log, resumed_log = _PromptLog(), _PromptLog(), _PromptLog()
    whole = _grpo(tmp_path / "whole", whole_log, max_steps=4)
    whole.train()
    assert whole._prompts.state_dict() == {"epoch": 0, "position": 8}  # 2 prompts per step, in stream order
    stream_order = [r["prompt"][-1]["content"] for r in CONV.prompt_only(8)]
    assert [p for call in whole_log.prompts for p in call] == [p for p in stream_order for _ in range(2)]
    _grpo(tmp_path / "parts", first_log, max_steps=4, save_strategy="steps", save_steps=2).train()
    resumed = _grpo(tmp_path / "parts", resumed_log, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    assert resumed_log.prompts == whole_log.prompts[2:]  # the two generations not yet trained on, and only those
    rewards = [h["reward"] for h in whole.state.log_history if "reward" in h]
    resumed_rewards = [h["reward"] for h in resumed.state.log_history if "reward" in h]
    assert resumed_rewards[-2:] == pytest.approx(rewards[2:], abs=1e-6)


def test_streamed_grpo_without_max_completion_length_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_completion_length"):
        pt.GRPOTrainer("tiny:nano", _PromptLog(), _args(pt.GRPOConfig, tmp_path, num_generations=2, max_completion_length=None),
                       train_dataset=CONV.prompt_only(8).to_iterable_dataset())
