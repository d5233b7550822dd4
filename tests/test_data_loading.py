"""Local data splits: a folder's files named by split load as those splits, exactly as
`datasets.load_dataset(<builder>, data_dir=...)` names them, and held-out rows are never training rows (issue 26,
items 1 and 2); the command line takes its evaluation set from the `test` split only."""

from __future__ import annotations

import logging

import datasets
import pytest
from _data_helpers import qa_rows, train_test_folder, write_jsonl

from posttrain.data import held_out_split, load_any, load_held_out, split_names
from posttrain.script_args import ScriptArguments, load_script_datasets


def _prompts(ds) -> set[str]:
    return set(ds["prompt"])


def test_train_and_test_files_are_two_splits_like_datasets(tmp_path):
    folder = train_test_folder(tmp_path / "data")
    reference = datasets.load_dataset("json", data_dir=str(folder))
    assert {k: len(v) for k, v in reference.items()} == {"train": 10, "test": 3}
    train, test = load_any(folder), load_any(folder, split="test")
    assert (len(train), len(test)) == (10, 3)
    assert _prompts(train) == _prompts(reference["train"]) and _prompts(test) == _prompts(reference["test"])
    assert not _prompts(train) & _prompts(test)
    assert split_names(folder) == ["test", "train"]
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_any(folder, split="validation")


@pytest.mark.parametrize("layout, expected", [
    ({"train.jsonl": 4, "test.jsonl": 2}, {"train": 4, "test": 2}),
    ({"data/train-00000-of-00001.jsonl": 4, "data/test-00000-of-00001.jsonl": 2}, {"train": 4, "test": 2}),
    ({"train-00000.jsonl": 2, "train-00001.jsonl": 2, "test-00000.jsonl": 1}, {"train": 4, "test": 1}),
    ({"train/a.jsonl": 3, "train/b.jsonl": 1, "validation/a.jsonl": 2}, {"train": 4, "validation": 2}),
    ({"my_train.jsonl": 3, "dev.jsonl": 2, "eval.jsonl": 1}, {"train": 3, "validation": 2, "test": 1}),
    ({"part0.jsonl": 3, "part1.jsonl": 2}, {"train": 5}),
])
def test_split_conventions_match_datasets(tmp_path, layout, expected):
    start = 0
    for name, n in layout.items():
        write_jsonl(tmp_path / name, qa_rows(n, start))
        start += 100
    reference = datasets.load_dataset("json", data_dir=str(tmp_path))
    assert {k: len(v) for k, v in reference.items()} == expected
    assert split_names(tmp_path) == sorted(expected)
    for split, n in expected.items():
        rows = load_any(tmp_path, split=split)
        assert len(rows) == n and _prompts(rows) == _prompts(reference[split])


def test_parquet_and_csv_splits(tmp_path):
    datasets.Dataset.from_list(qa_rows(6)).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    datasets.Dataset.from_list(qa_rows(2, 100)).to_parquet(str(tmp_path / "pq" / "test-00000.parquet"))
    assert (len(load_any(tmp_path / "pq")), len(load_any(tmp_path / "pq", split="test"))) == (6, 2)
    datasets.Dataset.from_list(qa_rows(5)).to_csv(str(tmp_path / "csv" / "train.csv"), index=False)
    datasets.Dataset.from_list(qa_rows(1, 100)).to_csv(str(tmp_path / "csv" / "test.csv"), index=False)
    test = load_any(tmp_path / "csv", split="test")
    assert len(load_any(tmp_path / "csv")) == 5 and test[0]["completion"] == " 101"  # text stays text


def test_files_outside_every_split_are_reported(tmp_path, caplog):
    write_jsonl(tmp_path / "train.jsonl", qa_rows(4))
    write_jsonl(tmp_path / "notes.jsonl", qa_rows(2, 100))
    with caplog.at_level(logging.WARNING, logger="posttrain.data.loading"):
        assert len(load_any(tmp_path)) == 4  # as datasets.load_dataset: notes.jsonl is in no split
    assert "1 data file(s) match no split" in caplog.text and "notes.jsonl" in caplog.text


def test_a_single_file_is_one_train_split(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", qa_rows(4))  # its name does not make it a test split
    assert len(load_any(path)) == 4 and split_names(path) == ["train"]
    with pytest.raises(ValueError, match=r"split 'test' not found.*one split, 'train'"):
        load_any(path, split="test")
    with pytest.raises(ValueError, match="one split, 'train'"):
        load_any([path, path], split="test")


def test_held_out_rows(tmp_path):
    folder = train_test_folder(tmp_path / "data")
    assert _prompts(load_held_out(folder)) == _prompts(load_any(folder, split="test"))
    single = write_jsonl(tmp_path / "held_out.jsonl", qa_rows(3, 500))
    assert held_out_split(single) == "train" and len(load_held_out(single)) == 3
    write_jsonl(tmp_path / "tv" / "train.jsonl", qa_rows(3))
    write_jsonl(tmp_path / "tv" / "validation.jsonl", qa_rows(2, 100))
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\] and none is 'test'"):
        load_held_out(tmp_path / "tv")
    assert len(load_held_out(tmp_path / "tv", split="validation")) == 2


# ------------------------------------------------------------------------------ the command line's datasets
def test_cli_folder_gives_train_10_and_test_3_disjoint(tmp_path):
    folder = train_test_folder(tmp_path / "data")
    train, test = load_script_datasets(ScriptArguments(dataset_name=str(folder)))
    assert (len(train), len(test)) == (10, 3)
    assert not _prompts(train) & _prompts(test)


def test_cli_one_file_has_no_eval_by_default(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    with caplog.at_level(logging.WARNING, logger="posttrain.script_args"):
        train, test = load_script_datasets(ScriptArguments(dataset_name=str(path)))
    assert len(train) == 10 and test is None
    assert "no 'test' split" in caplog.text and "training without evaluation" in caplog.text


@pytest.mark.parametrize("split", ["test", "validation"])
def test_cli_missing_test_split_is_an_error_naming_the_splits(tmp_path, split):
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    with pytest.raises(ValueError, match=rf"split '{split}' not found.*one split, 'train'"):
        load_script_datasets(ScriptArguments(dataset_name=str(path), dataset_test_split=split))


def test_cli_named_split_must_exist(tmp_path):
    folder = train_test_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_script_datasets(ScriptArguments(dataset_name=str(folder), dataset_test_split="validation"))
    assert len(load_script_datasets(ScriptArguments(dataset_name=str(folder), dataset_test_split="test"))[1]) == 3
    task = dict(task_train_size=8, task_test_size=2)
    with pytest.raises(ValueError, match=r"task:arithmetic.*\['test', 'train'\]"):
        load_script_datasets(ScriptArguments(**task, dataset_test_split="validation"))
    assert len(load_script_datasets(ScriptArguments(**task, dataset_test_split="test"))[1]) == 2
    assert len(load_script_datasets(ScriptArguments(**task))[1]) == 2


@pytest.mark.parametrize("off", [None, "none", "None", "null"])
def test_cli_dataset_test_split_none_turns_eval_off(tmp_path, off):
    folder = train_test_folder(tmp_path / "data")
    assert load_script_datasets(ScriptArguments(dataset_name=str(folder), dataset_test_split=off))[1] is None
    task = ScriptArguments(task_train_size=8, task_test_size=2, dataset_test_split=off)
    assert load_script_datasets(task)[1] is None


def test_cli_never_evaluates_on_the_training_split(tmp_path):
    folder = train_test_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="is the training split"):
        load_script_datasets(ScriptArguments(dataset_name=str(folder), dataset_test_split="train"))
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    with pytest.raises(ValueError, match="would score the training rows"):
        load_script_datasets(ScriptArguments(dataset_name=str(path), eval_dataset_name=str(path)))


def test_cli_explicit_eval_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    held = write_jsonl(tmp_path / "held_out.jsonl", qa_rows(4, 100))
    train, test = load_script_datasets(ScriptArguments(dataset_name=str(path), eval_dataset_name=str(held)))
    assert (len(train), len(test)) == (10, 4) and not _prompts(train) & _prompts(test)
    folder = train_test_folder(tmp_path / "data")
    _, test = load_script_datasets(ScriptArguments(dataset_name=str(path), eval_dataset_name=str(folder)))
    assert len(test) == 3  # a folder's test split, not its training rows


def test_every_method_command_gets_no_eval_from_one_file(tmp_path):
    from posttrain.cli import parse_method_args
    from posttrain.trainers.registry import list_methods

    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(4))
    methods = [spec.name for spec in list_methods()]
    assert {"sft", "dpo", "reward", "prm", "grpo", "rloo", "kto"} <= set(methods)
    for name in methods:
        script, *_ = parse_method_args(name, ["--dataset_name", str(path), "--output_dir", str(tmp_path / name)])
        assert script.dataset_test_split == "auto"
        assert load_script_datasets(script)[1] is None, name
        off, *_ = parse_method_args(name, ["--dataset_test_split", "none", "--output_dir", str(tmp_path / name)])
        assert load_script_datasets(off)[1] is None, name


def test_a_folder_given_as_eval_dataset_is_its_test_split(tmp_path):
    import json

    from posttrain import SFTConfig, SFTTrainer

    for split, n in (("train", 6), ("test", 2)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"{split} {i} =", "completion": f" {i}"}) + "\n")
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", save_strategy="no",
                     disable_tqdm=True)
    trainer = SFTTrainer("tiny:nano", args=args, train_dataset=str(tmp_path), eval_dataset=str(tmp_path))
    assert len(trainer.train_dataset) == 6 and len(trainer.eval_dataset) == 2
