"""PRMTrainer: stepwise data laid out with labels at the separators, the per-step loss wired to the model's
logits, last-step-only training, bad rows failing before training, and held-out step accuracy on the task."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from posttrain import PRMConfig, PRMTrainer
from posttrain.data import DatasetFormatError
from posttrain.models import build_tiny, load_tokenizer
from posttrain.online.rewards.inputs import encode_steps, separator_ids
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.prm import step_accuracy


def _args(tmp_path, **kw) -> PRMConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=32,
                learning_rate=1e-3, max_steps=2, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                max_length=128, logging_steps=1)
    base.update(kw)
    return PRMConfig(**base)


ROW = {"prompt": "What is 12 + 30?\n", "completions": ["2+0=2, write 2 carry 0.", "1+3=5, write 5 carry 0.",
                                                       "<answer>52</answer>"], "labels": [True, False, False]}


def test_labels_sit_on_the_separator_after_each_step():
    tok = load_tokenizer("tiny:nano")
    for sep in ("\n", " || "):
        out = encode_steps(tok, ROW["prompt"], ROW["completions"], separator=sep, labels=ROW["labels"])
        sep_ids = separator_ids(tok, sep)
        ids, labels = out["input_ids"], out["labels"]
        positions = [t for t, y in enumerate(labels) if y != -100]
        assert positions == out["step_positions"] and len(positions) == 3
        assert [labels[p] for p in positions] == [1, 0, 0]
        for p in positions:  # each labelled token is the last token of a whole separator
            assert ids[p - len(sep_ids) + 1 : p + 1] == sep_ids
        # the text between separators is exactly each step
        text = tok.decode(ids)
        assert text == ROW["prompt"] + "".join(s + sep for s in ROW["completions"])
    full = encode_steps(tok, ROW["prompt"], ROW["completions"], labels=ROW["labels"])
    positions = full["step_positions"]
    cut = encode_steps(tok, ROW["prompt"], ROW["completions"], labels=ROW["labels"], max_length=positions[1])
    assert cut["truncated"] and cut["step_positions"] == positions[:1]
    assert cut["input_ids"] == full["input_ids"][: positions[1]] and cut["labels"] == full["labels"][: positions[1]]


def test_max_completion_length_cuts_the_steps_and_keeps_the_prompt(tmp_path):
    """TRL's max_completion_length: the steps (not the prompt) keep their first N tokens, before max_length."""
    tok = load_tokenizer("tiny:nano")
    full = encode_steps(tok, ROW["prompt"], ROW["completions"], labels=ROW["labels"])
    prompt_len = len(encode_steps(tok, ROW["prompt"], [], labels=[])["input_ids"])
    positions = full["step_positions"]
    n = positions[1] - prompt_len  # the completion budget that ends just before step 2's separator is whole
    cut = encode_steps(tok, ROW["prompt"], ROW["completions"], labels=ROW["labels"], max_completion_length=n)
    assert cut["truncated"] and cut["step_positions"] == positions[:1]
    assert cut["input_ids"] == full["input_ids"][: prompt_len + n]
    both = encode_steps(tok, ROW["prompt"], ROW["completions"], labels=ROW["labels"], max_completion_length=n,
                        max_length=positions[0])  # the tighter limit wins
    assert both["input_ids"] == full["input_ids"][: positions[0]] and both["step_positions"] == []
    data = Dataset.from_list([ROW] * 4)
    trainer = PRMTrainer("tiny:nano", _args(tmp_path, max_completion_length=n), train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    assert len(row["input_ids"]) == prompt_len + n and sum(y != -100 for y in row["step_labels"]) == 1
    with pytest.raises(ValueError, match="max_completion_length=0"):
        _args(tmp_path, max_completion_length=0)


def test_loss_is_the_per_step_cross_entropy_of_the_model(tmp_path):
    data = ArithmeticTask(digits=2, seed=0).stepwise(8)
    for last_only in (False, True):
        trainer = PRMTrainer("tiny:nano", args=_args(tmp_path, train_on_last_step_only=last_only), train_dataset=data)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
            # by hand: one sequence at a time, unpadded, log-softmax at each step's separator
            terms = []
            for i in range(4):
                row = data[i]
                enc = encode_steps(trainer.tokenizer, row["prompt"], row["completions"], labels=row["labels"])
                logits = trainer.model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
                pairs = list(zip(enc["step_positions"], row["labels"]))
                for pos, label in pairs[-1:] if last_only else pairs:
                    terms.append(-torch.log_softmax(logits[pos], -1)[int(label)].item())
        assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_trains_on_conversational_prompts_and_logs_step_metrics(tmp_path):
    data = ArithmeticTask(digits=2, seed=0, conversational=True).stepwise(16)
    trainer = PRMTrainer("tiny:nano", args=_args(tmp_path, max_steps=4, step_separator=" | "), train_dataset=data,
                         eval_dataset=data)
    first = trainer.train_dataset[0]
    assert trainer.tokenizer.decode(first["input_ids"]).startswith("<|im_start|>user\nWhat is")
    trainer.train()
    logs = [e for e in trainer.state.log_history if "step_accuracy" in e]
    assert logs and {"positive_accuracy", "positive_fraction", "num_steps"} <= set(logs[-1])
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_step_accuracy"] <= 1.0


def test_memorizes_a_small_set(tmp_path):
    """The trainer measurably learns: on a few rows, step accuracy goes from chance to near perfect."""
    data = ArithmeticTask(digits=2, seed=0).stepwise(8)
    model, tok = build_tiny("nano", seed=0)  # a causal LM object gets a token-classification head
    trainer = PRMTrainer(model, args=_args(tmp_path, max_steps=50, per_device_train_batch_size=8, learning_rate=3e-3),
                         train_dataset=data, processing_class=tok)
    before = step_accuracy(trainer.model, tok, data)
    trainer.train()
    after = step_accuracy(trainer.model, tok, data)
    assert after["step_accuracy"] >= 0.95 > before["step_accuracy"]
    assert after["negative_accuracy"] >= 0.9


@pytest.mark.parametrize(
    "rows,field",
    [
        ([ROW, {**ROW, "labels": [True, False]}], "row 1, field 'labels'"),  # length does not match the steps
        ([ROW, ROW, {**ROW, "labels": [True, None, False]}], "row 2, field 'labels[1]'"),  # not a boolean
        ([{**ROW, "labels": [1, 0, 0]}], "row 0, field 'labels[0]'"),  # 0/1 integers are not booleans
        ([ROW, {"prompt": "x", "completions": None, "labels": [True]}], "row 1, field 'completions'"),
        ([ROW, {**ROW, "completions": ["a", None, "c"]}], "row 1, field 'completions[1]'"),
        ([ROW, {"prompt": None, "completions": ["a"], "labels": [True]}], "row 1, field 'prompt'"),
    ],
)
def test_bad_rows_fail_before_training(tmp_path, rows, field):
    with pytest.raises(DatasetFormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        PRMTrainer("tiny:nano", args=_args(tmp_path), train_dataset=Dataset.from_list(rows))


def test_missing_labels_column_names_what_is_expected(tmp_path):
    data = Dataset.from_list([{"prompt": "p", "completions": ["a", "b"]}])
    with pytest.raises(DatasetFormatError, match="stepwise"):
        PRMTrainer("tiny:nano", args=_args(tmp_path), train_dataset=data)


def test_config_rejects_padding_free_and_empty_separator(tmp_path):
    with pytest.raises(ValueError, match="padding_free"):
        _args(tmp_path, padding_free=True)
    with pytest.raises(ValueError, match="step_separator"):
        _args(tmp_path, step_separator="")


@pytest.mark.slow
def test_held_out_step_accuracy_beats_the_majority_baseline(tmp_path):
    """A tiny PRM from scratch learns to flag the step with a carry slip, the correct-looking steps after it,
    and a final answer that disagrees with the columns, on problems it never saw: held-out step accuracy
    0.953 against a majority baseline of 0.693, wrong-step accuracy 0.848 (1000 steps of 32, about 2 min on
    one thread). Four heads matter: with nano's single head the same budget often ends at the baseline."""
    splits = ArithmeticTask(digits=2, seed=0, errors="carry").split(2000, 200, "stepwise", "stepwise")
    trainer = PRMTrainer(PRM_MODEL, args=_args(tmp_path, **PRM_RECIPE), train_dataset=splits["train"])
    trainer.train()
    result = step_accuracy(trainer.model, trainer.tokenizer, splits["test"])
    print(f"held-out PRM: {result}")
    assert result["step_accuracy"] >= result["majority_baseline"] + 0.15
    assert not math.isnan(result["negative_accuracy"]) and result["negative_accuracy"] >= 0.6


PRM_MODEL = "tiny:nano,heads=4"
PRM_RECIPE = dict(max_steps=1000, per_device_train_batch_size=32, learning_rate=1e-3,
                  lr_scheduler_type="constant_with_warmup", warmup_steps=20, logging_steps=100)
