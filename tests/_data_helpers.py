"""Shared pieces of the data-loading and CLI tests: small local data files with rows that tell their split."""

from __future__ import annotations

import json
from pathlib import Path


def qa_rows(n: int, start: int = 0) -> list[dict]:
    """`n` prompt-completion rows, each unique (`What is i + 1?` for i from `start`), so that a row's split is
    known from its text."""
    return [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}"} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_test_folder(folder: Path, n_train: int = 10, n_test: int = 3) -> Path:
    """The standard layout: `folder/train.jsonl` (rows 0..n_train-1) and `folder/test.jsonl` (rows from 100)."""
    write_jsonl(folder / "train.jsonl", qa_rows(n_train))
    write_jsonl(folder / "test.jsonl", qa_rows(n_test, start=100))
    return folder


def env_reward(prompts, completions, **kwargs):
    """A reward read from the environment variable POSTTRAIN_TEST_REWARD at scoring time: a run whose logged
    reward equals it saw the run file's `env:` block."""
    import os

    return [float(os.environ["POSTTRAIN_TEST_REWARD"])] * len(completions)


def trainer_case(method: str, n: int = 8):
    """(trainer class, config class, config kwargs, dataset of about `n` rows) of each offline method, on the
    arithmetic task, conversational where the method takes conversations (for the data-pipeline tests)."""
    import posttrain as pt
    from posttrain.tasks import ArithmeticTask

    conv, plain = ArithmeticTask(digits=2, conversational=True), ArithmeticTask(digits=2)
    table = {
        "sft": (pt.SFTTrainer, pt.SFTConfig, {}, lambda: conv.prompt_completion(n)),
        "sft_packed": (pt.SFTTrainer, pt.SFTConfig, {"packing": True}, lambda: plain.language_modeling(n)),
        "sft_text_field": (pt.SFTTrainer, pt.SFTConfig, {"dataset_text_field": "body"},
                           lambda: plain.language_modeling(n).rename_column("text", "body")),
        "dpo": (pt.DPOTrainer, pt.DPOConfig, {}, lambda: conv.preference(n)),
        "dpo_implicit": (pt.DPOTrainer, pt.DPOConfig, {}, lambda: plain.preference(n, implicit_prompt=True)),
        "cpo": (pt.CPOTrainer, pt.CPOConfig, {}, lambda: conv.preference(n)),
        "orpo": (pt.ORPOTrainer, pt.ORPOConfig, {}, lambda: plain.preference(n)),
        "kto": (pt.KTOTrainer, pt.KTOConfig, {}, lambda: conv.unpaired_preference(n)),
        "kto_from_pairs": (pt.KTOTrainer, pt.KTOConfig, {}, lambda: plain.preference(n // 2)),
        "bco": (pt.BCOTrainer, pt.BCOConfig, {}, lambda: plain.unpaired_preference(n)),
        "reward": (pt.RewardTrainer, pt.RewardConfig, {}, lambda: conv.preference(n)),
        "prm": (pt.PRMTrainer, pt.PRMConfig, {}, lambda: plain.stepwise(n)),
    }
    trainer_cls, config_cls, extra, data = table[method]
    return trainer_cls, config_cls, extra, data()
