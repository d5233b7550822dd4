"""Dataset mixtures: sources drawn in their weights or counts with a seed, each validated and reported by
source, from Python (`mix_datasets`) and from a YAML run file's `datasets:`."""

from __future__ import annotations

from collections import Counter

import pytest

from posttrain.data import DatasetFormatError
from posttrain.data.mixtures import DatasetSource, mix_datasets, mix_with_report

from _data_helpers import qa_rows, write_jsonl


def _origin(row) -> str:
    """Which source a row came from: source A holds the problems 0..999, source B those from 1000."""
    return "a" if int(row["prompt"].split()[2]) < 1000 else "b"


@pytest.fixture
def two_sources(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", qa_rows(120)), write_jsonl(tmp_path / "b.jsonl", qa_rows(100, 1000))


def test_two_sources_are_drawn_in_their_weights_and_interleaved_with_the_seed(two_sources):
    a, b = two_sources
    mixed, report = mix_with_report([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], seed=1)
    # A (120 rows) is the scarce one at weight 3/4: 160 rows in all, 120 from A and 40 from B
    assert Counter(_origin(r) for r in mixed) == {"a": 120, "b": 40}
    assert [s["drawn"] for s in report.sources] == [120, 40] and [s["available"] for s in report.sources] == [120, 100]
    assert len({r["prompt"] for r in mixed}) == 160  # no row twice
    head = Counter(_origin(r) for r in mixed.select(range(40)))
    assert head["b"] > 0 and head["a"] > 0  # interleaved, not one source after the other
    again = mix_datasets([DatasetSource(str(a), weight=3), DatasetSource(str(b), weight=1)], seed=1)
    assert again["prompt"] == mixed["prompt"]
    other = mix_datasets([DatasetSource(str(a), weight=3), DatasetSource(str(b), weight=1)], seed=2)
    assert other["prompt"] != mixed["prompt"] and sorted(other["prompt"]) != sorted(mixed["prompt"])


def test_counts_num_rows_and_columns(two_sources, tmp_path):
    a, b = two_sources
    mixed = mix_datasets([{"path": str(a), "count": 7}, {"path": str(b)}], seed=0)
    assert Counter(_origin(r) for r in mixed) == {"a": 7, "b": 100}
    mixed = mix_datasets([{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}], num_rows=50)
    assert Counter(_origin(r) for r in mixed) == {"a": 25, "b": 25}
    extra = write_jsonl(tmp_path / "c.jsonl", [{"question": r["prompt"], "answer": r["completion"], "id": i}
                                               for i, r in enumerate(qa_rows(10, 2000))])
    mixed = mix_datasets([{"path": str(a), "count": 5},
                          {"path": str(extra), "columns": {"question": "prompt", "answer": "completion"}}])
    assert mixed.column_names == ["prompt", "completion"] and len(mixed) == 15


def test_streamed_mixture_draws_in_its_weights(two_sources):
    a, b = two_sources
    mixed = mix_datasets([{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}], seed=0, streaming=True)
    counts = Counter(_origin(r) for r in mixed.take(100))
    assert 15 <= counts["a"] <= 35 and counts["a"] + counts["b"] == 100  # 25 expected (binomial sd 4.3)


def test_a_bad_row_or_a_format_mismatch_names_its_source(two_sources, tmp_path):
    a, _ = two_sources
    rows = qa_rows(5, 3000)
    rows[3]["completion"] = None
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetFormatError, match=r"source 1 \(.*bad.jsonl, split train\): row 3, field 'completion'"):
        mix_datasets([{"path": str(a)}, {"path": str(bad)}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                                  "completion": [{"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DatasetFormatError, match="conversational.*share one format"):
        mix_datasets([{"path": str(a)}, {"path": str(chat)}])
    with pytest.raises(ValueError, match="weight or count, not both"):
        mix_datasets([{"path": str(a), "weight": 1, "count": 3}])
    with pytest.raises(ValueError, match="unknown field"):
        mix_datasets([{"path": str(a), "wieght": 1}])
    with pytest.raises(ValueError, match="count=500 but it has 120 rows"):
        mix_datasets([{"path": str(a), "count": 500}])


def test_yaml_datasets_mixture_reaches_the_training_data(two_sources, tmp_path):
    from posttrain.cli import parse_method_args
    from posttrain.script_args import load_script_datasets

    a, b = two_sources
    run = tmp_path / "run.yaml"
    run.write_text(f"datasets:\n  - path: {a}\n    weight: 3\n  - path: {b}\n    split: train\n    weight: 1\n"
                   "dataset_mixture_seed: 5\nmax_steps: 1\n")
    script, config = parse_method_args("sft", ["--config", str(run)])
    train, test = load_script_datasets(script)
    assert Counter(_origin(r) for r in train) == {"a": 120, "b": 40} and test is None
    assert train["prompt"] == mix_datasets([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], seed=5)["prompt"]
    run.write_text(f"datasets:\n  - path: {a}\n    weight: 3\n  - path: {b}\n    weight: 1\ndataset_streaming: true\n")
    script, _ = parse_method_args("sft", ["--config", str(run)])
    stream, _ = load_script_datasets(script)
    assert len(list(stream.take(10))) == 10 and not hasattr(stream, "__len__")
