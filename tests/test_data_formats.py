"""Dataset formats: detection of every kind, every bad-row case, implicit prompts, unpairing, load_any."""

import json

import datasets
import pytest

from posttrain.data import (
    DatasetFormatError,
    DatasetKind,
    FormatInfo,
    detect_format,
    load_any,
    split_implicit_prompt,
    unpair_preference,
    validate_dataset,
)

K = DatasetKind


def conv(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


P_CONV = conv(("system", "Be brief."), ("user", "2+2?"))
A4, A5 = conv(("assistant", "4")), conv(("assistant", "5"))

GOOD = {
    (K.LANGUAGE_MODELING, False): {"text": ["hello world", "bye"]},
    (K.LANGUAGE_MODELING, True): {"messages": [P_CONV + A4, P_CONV + A5]},
    (K.PROMPT_ONLY, False): {"prompt": ["2+2?", "3+3?"]},
    (K.PROMPT_ONLY, True): {"prompt": [P_CONV, P_CONV]},
    (K.PROMPT_COMPLETION, False): {"prompt": ["2+2?", "3+3?"], "completion": [" 4", " 6"]},
    (K.PROMPT_COMPLETION, True): {"prompt": [P_CONV, P_CONV], "completion": [A4, A5]},
    (K.PREFERENCE, False): {"prompt": ["2+2?"] * 2, "chosen": [" 4"] * 2, "rejected": [" 5"] * 2},
    (K.PREFERENCE, True): {"prompt": [P_CONV] * 2, "chosen": [A4] * 2, "rejected": [A5] * 2},
    (K.UNPAIRED_PREFERENCE, False): {"prompt": ["2+2?"] * 2, "completion": [" 4", " 5"], "label": [True, False]},
    (K.UNPAIRED_PREFERENCE, True): {"prompt": [P_CONV] * 2, "completion": [A4, A5], "label": [True, False]},
    (K.STEPWISE, False): {"prompt": ["2+2*3?"], "completions": [["2*3=6", "2+6=8"]], "labels": [[True, True]]},
    (K.STEPWISE, True): {"prompt": [P_CONV], "completions": [["2*3=6", "2+6=9"]], "labels": [[True, False]]},
}


@pytest.mark.parametrize("kind,conversational", list(GOOD), ids=[f"{k.value}-{c}" for k, c in GOOD])
def test_detect_and_validate_every_format(kind, conversational):
    columns = dict(GOOD[(kind, conversational)])
    columns["source"] = ["x"] * len(next(iter(columns.values())))  # extra columns are allowed
    expected = FormatInfo(kind, conversational, implicit_prompt=False)
    for data in (columns, datasets.Dataset.from_dict(columns)):
        assert detect_format(data) == expected
        assert validate_dataset(data, [kind]) == expected


@pytest.mark.parametrize("conversational", [False, True])
def test_implicit_prompt_preference(conversational):
    if conversational:
        data = {"chosen": [P_CONV + A4], "rejected": [P_CONV + A5]}
    else:
        data = {"chosen": ["Q: 2+2? A: 4"], "rejected": ["Q: 2+2? A: 5"]}
    info = validate_dataset(datasets.Dataset.from_dict(data), [K.PREFERENCE])
    assert info == FormatInfo(K.PREFERENCE, conversational, implicit_prompt=True)


def test_validate_rejects_a_kind_the_method_does_not_take():
    with pytest.raises(DatasetFormatError, match=r"accepts preference .* make a prompt_completion dataset"):
        validate_dataset(GOOD[(K.PROMPT_COMPLETION, False)], [K.PREFERENCE])


def test_unknown_columns_name_the_formats():
    with pytest.raises(DatasetFormatError, match=r"\['answer', 'question'\].*'prompt', 'completion'"):
        detect_format({"question": ["a"], "answer": ["b"]})


BAD_MSG = {"role": "user", "content": "ok"}

# (rows, row index, field named in the message, expected-substring)
BAD_ROWS = {
    "completion None": (
        [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
        1, "completion", "expected a string or a list of messages, got None",
    ),
    "missing field": ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], 1, "completion", "missing"),
    "wrong type": ([{"text": "a"}, {"text": "b"}, {"text": 3}], 2, "text", "got int 3"),
    "list in plain dataset": ([{"prompt": "a"}, {"prompt": [BAD_MSG]}], 1, "prompt", "plain text"),
    "string in conversational dataset": (
        [{"prompt": [BAD_MSG]}, {"prompt": "hi"}], 1, "prompt", "a list of messages (the dataset is conversational)",
    ),
    "unknown role": (
        [{"messages": [BAD_MSG]}, {"messages": [BAD_MSG, {"role": "robot", "content": "x"}]}],
        1, "messages[1].role", "'robot'",
    ),
    "empty conversation": ([{"messages": [BAD_MSG]}, {"messages": []}], 1, "messages", "non-empty list of messages"),
    "message without content": (
        [{"messages": [BAD_MSG, {"role": "assistant"}]}], 0, "messages[1].content", "expected a string",
    ),
    "message content None": (
        [{"messages": [BAD_MSG]}, {"messages": [{"role": "user", "content": None}]}], 1, "messages[0].content", "None",
    ),
    "message not a dict": ([{"messages": [BAD_MSG]}, {"messages": ["hi"]}], 1, "messages[0]", "message dict"),
    "chosen None": (
        [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "chosen": None, "rejected": "b"}],
        3, "chosen", "got None",
    ),
    "rejected None": ([{"prompt": "p", "chosen": "a", "rejected": None}], 0, "rejected", "got None"),
    "label None": (
        [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "a", "label": None}],
        1, "label", "expected a boolean",
    ),
    "label not bool": ([{"prompt": "p", "completion": "a", "label": 1}], 0, "label", "expected a boolean"),
    "labels length": (
        [{"prompt": "p", "completions": ["a", "b"], "labels": [True]}], 0, "labels", "expected 2 labels",
    ),
    "labels not bool": (
        [{"prompt": "p", "completions": ["a", "b"], "labels": [True, "yes"]}], 0, "labels[1]", "a boolean",
    ),
    "completions not list": ([{"prompt": "p", "completions": "a", "labels": [True]}], 0, "completions", "list"),
    "step not string": ([{"prompt": "p", "completions": ["a", None], "labels": [True, True]}], 0, "completions[1]", "None"),
    "implicit prompt without shared messages": (
        [{"chosen": A4, "rejected": A5}], 0, "chosen", "share their leading prompt messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_name_the_row_and_field(case):
    rows, index, field, expected = BAD_ROWS[case]
    with pytest.raises(DatasetFormatError) as err:
        validate_dataset(rows)
    message = str(err.value)
    assert f"row {index}, field '{field}'" in message, message
    assert expected in message, message
    assert isinstance(err.value, ValueError)


def test_bad_row_in_an_arrow_dataset():
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    rows[17]["completion"] = None
    with pytest.raises(DatasetFormatError, match=r"^row 17, field 'completion': expected a string or a list of messages, got None$"):
        validate_dataset(datasets.Dataset.from_list(rows))


def test_assistant_tool_call_without_content_is_valid():
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    tool = {"role": "tool", "content": "42"}
    info = validate_dataset({"messages": [[BAD_MSG, call, tool, {"role": "assistant", "content": "42"}]]})
    assert info.kind is K.LANGUAGE_MODELING and info.conversational


def test_validation_reads_columns_of_a_selected_view():
    rows = [{"text": "ok"}] * 10 + [{"text": None}]
    ds = datasets.Dataset.from_list(rows)
    validate_dataset(ds.select(range(10)))  # the view excludes the bad row
    with pytest.raises(DatasetFormatError, match="row 2, field 'text'"):
        validate_dataset(ds.select([0, 1, 10]))


def test_split_implicit_prompt_strings_cut_at_a_word_boundary():
    out = split_implicit_prompt({"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: five", "id": 7})
    assert out == {"prompt": "Q: 2+2? A:", "chosen": " four", "rejected": " five", "id": 7}
    out = split_implicit_prompt({"chosen": "Hello", "rejected": "Hello world"})
    assert out["prompt"] == "" and out["chosen"] == "Hello" and out["rejected"] == "Hello world"


def test_split_implicit_prompt_conversations():
    out = split_implicit_prompt({"chosen": P_CONV + A4, "rejected": P_CONV + A5})
    assert out == {"prompt": P_CONV, "chosen": A4, "rejected": A5}
    same = split_implicit_prompt({"chosen": P_CONV + A4, "rejected": P_CONV + A4})
    assert same["prompt"] == P_CONV and same["chosen"] == A4  # one message is always left on each side
    explicit = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert split_implicit_prompt(explicit) == explicit


def test_unpair_preference_explicit_and_implicit():
    ds = datasets.Dataset.from_dict({"prompt": ["p1", "p2"], "chosen": [" a", " b"], "rejected": [" c", " d"], "id": [1, 2]})
    out = unpair_preference(ds)
    assert out.to_list() == [
        {"prompt": "p1", "completion": " a", "label": True, "id": 1},
        {"prompt": "p1", "completion": " c", "label": False, "id": 1},
        {"prompt": "p2", "completion": " b", "label": True, "id": 2},
        {"prompt": "p2", "completion": " d", "label": False, "id": 2},
    ]
    assert validate_dataset(out).kind is K.UNPAIRED_PREFERENCE
    implicit = datasets.Dataset.from_dict({"chosen": [P_CONV + A4], "rejected": [P_CONV + A5]})
    rows = unpair_preference(implicit).to_list()
    assert [r["prompt"] for r in rows] == [P_CONV, P_CONV]
    assert [(r["completion"], r["label"]) for r in rows] == [(A4, True), (A5, False)]


ROWS = [{"prompt": "2+2?", "completion": " 4"}, {"prompt": "3+3?", "completion": " 6"}]


@pytest.mark.parametrize("ext", ["json", "jsonl", "parquet", "csv"])
def test_load_any_local_files(tmp_path, ext):
    path = tmp_path / f"data.{ext}"
    if ext == "json":
        path.write_text(json.dumps(ROWS))
    elif ext == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif ext == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    assert load_any(path).to_list() == ROWS
    assert load_any(str(path)).to_list() == ROWS


def test_load_any_lists_folders_and_dicts(tmp_path):
    for i, row in enumerate(ROWS):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps(row) + "\n")
    assert load_any([tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]).to_list() == ROWS
    assert load_any(tmp_path).to_list() == ROWS
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(saved))
    assert load_any(saved, split="test").to_list() == ROWS[:1]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    assert load_any(dd).to_list() == ROWS
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['train'\]"):
        load_any(dd, split="validation")
    ds = datasets.Dataset.from_list(ROWS)
    assert load_any(ds) is ds
    assert load_any(ROWS).to_list() == ROWS
    assert load_any({"prompt": ["a"], "completion": ["b"]}).to_list() == [{"prompt": "a", "completion": "b"}]
    with pytest.raises(FileNotFoundError):
        load_any(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError):
        load_any(42)
