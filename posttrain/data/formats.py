"""Dataset formats: detection from the columns and validation of every row, in one place.

Every method declares the formats it accepts (`DatasetKind`); `validate_dataset` tells which format a dataset
is in and checks every row before training starts, so a bad row fails with a `DatasetFormatError` that names
the row index, the field and what was expected instead of a shape error deep inside a training step.

Formats (each either plain strings or conversational, i.e. lists of `{"role", "content"}` messages):

| kind                | columns                                                        |
| ------------------- | -------------------------------------------------------------- |
| LANGUAGE_MODELING   | `text` (string) or `messages` (conversation)                   |
| PROMPT_ONLY         | `prompt`                                                       |
| PROMPT_COMPLETION   | `prompt`, `completion`                                         |
| PREFERENCE          | `prompt`, `chosen`, `rejected`; or `chosen`, `rejected` only   |
|                     | (implicit prompt: their shared prefix, see `split_implicit_prompt`) |
| UNPAIRED_PREFERENCE | `prompt`, `completion`, `label` (bool)                         |
| STEPWISE            | `prompt`, `completions` (list of strings), `labels` (list of bool) |
| TOKENIZED           | `input_ids` (list of ints), optional per-token `completion_mask`,  |
|                     | `assistant_masks`, `attention_mask` (0/1) and `labels` (-100 = no loss) |

A dataset with an `input_ids` column is TOKENIZED whatever its other columns (it is used as is, as TRL does).
An optional `tools` column holds the tool schemas a chat template renders: a list of JSON-schema dicts, or a
JSON string of one (the usual layout on the hub, since Arrow cannot store dicts of varying shapes); see
`parse_tools`. Extra columns are allowed and kept. Validation reads whole columns (Arrow -> Python once per
column), never indexes a `datasets.Dataset` row by row, so it is fast enough to run on every dataset before
training.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import datasets

from .errors import DatasetFormatError

ROLES = ("system", "user", "assistant", "tool")
_MISSING = object()
_SEQ = "a string or a list of messages"


class DatasetKind(str, Enum):
    """The dataset formats that posttrain's methods consume."""

    LANGUAGE_MODELING = "language_modeling"
    PROMPT_ONLY = "prompt_only"
    PROMPT_COMPLETION = "prompt_completion"
    PREFERENCE = "preference"
    UNPAIRED_PREFERENCE = "unpaired_preference"
    STEPWISE = "stepwise"
    TOKENIZED = "tokenized"


TOKEN_MASK_COLUMNS = ("completion_mask", "assistant_masks", "attention_mask")

_KIND_COLUMNS = {
    DatasetKind.LANGUAGE_MODELING: "'text' or 'messages'",
    DatasetKind.PROMPT_ONLY: "'prompt'",
    DatasetKind.PROMPT_COMPLETION: "'prompt', 'completion'",
    DatasetKind.PREFERENCE: "'prompt', 'chosen', 'rejected' (or 'chosen', 'rejected' only)",
    DatasetKind.UNPAIRED_PREFERENCE: "'prompt', 'completion', 'label'",
    DatasetKind.STEPWISE: "'prompt', 'completions', 'labels'",
    DatasetKind.TOKENIZED: "'input_ids'",
}


@dataclass(frozen=True)
class FormatInfo:
    """What `detect_format` found: the kind, whether rows are conversations, and whether the prompt is implicit."""

    kind: DatasetKind
    conversational: bool
    implicit_prompt: bool = False
    image_column: str | None = None  # vision data: the column holding each row's images ('images' or 'image')


class _Table:
    """Column access over a `datasets.Dataset`, a dict of columns or a list of row dicts."""

    def __init__(self, data: Any):
        if isinstance(data, datasets.Dataset):
            self.names = list(data.column_names)
            self.num_rows = len(data)
            arrow = data.with_format("arrow")
            self._get: Callable[[str], list] = lambda c: arrow[c].to_pylist()
        elif isinstance(data, Mapping):
            self.names = list(data.keys())
            lengths = {len(v) for v in data.values()}
            if len(lengths) > 1:
                raise DatasetFormatError(f"columns have different lengths: { {k: len(v) for k, v in data.items()} }")
            self.num_rows = lengths.pop() if lengths else 0
            self._get = lambda c: list(data[c])
        elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            self.names = list(dict.fromkeys(k for row in data for k in row))
            self.num_rows = len(data)
            self._get = lambda c: [row.get(c, _MISSING) for row in data]
        else:
            raise TypeError(f"expected a datasets.Dataset, a dict of columns or a list of rows, got {type(data).__name__}")
        self._cache: dict[str, list] = {}

    def column(self, name: str) -> list:
        if name not in self._cache:
            self._cache[name] = self._get(name)
        return self._cache[name]


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "None"
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _fail(row: int, field: str, expected: str, value: Any) -> DatasetFormatError:
    return DatasetFormatError(f"row {row}, field '{field}': expected {expected}, got {_describe(value)}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_


def _kind_from_columns(names: Sequence[str]) -> tuple[DatasetKind, bool]:
    cols = set(names)
    if "input_ids" in cols:
        return DatasetKind.TOKENIZED, False
    if {"prompt", "completions", "labels"} <= cols:
        return DatasetKind.STEPWISE, False
    if {"chosen", "rejected"} <= cols:
        return DatasetKind.PREFERENCE, "prompt" not in cols
    if {"prompt", "completion", "label"} <= cols:
        return DatasetKind.UNPAIRED_PREFERENCE, False
    if {"prompt", "completion"} <= cols:
        return DatasetKind.PROMPT_COMPLETION, False
    if "messages" in cols or "text" in cols:
        return DatasetKind.LANGUAGE_MODELING, False
    if "prompt" in cols:
        return DatasetKind.PROMPT_ONLY, False
    formats = "; ".join(f"{k.value}: {c}" for k, c in _KIND_COLUMNS.items())
    raise DatasetFormatError(f"cannot tell the dataset format from its columns {sorted(cols)}; expected one of: {formats}")


def _sequence_fields(kind: DatasetKind, names: Sequence[str], implicit: bool) -> list[str]:
    """The fields holding a string or a conversation, key field first."""
    if kind is DatasetKind.LANGUAGE_MODELING:
        return ["messages" if "messages" in names else "text"]
    if kind is DatasetKind.PREFERENCE:
        return ["chosen", "rejected"] if implicit else ["prompt", "chosen", "rejected"]
    if kind in (DatasetKind.PROMPT_COMPLETION, DatasetKind.UNPAIRED_PREFERENCE):
        return ["prompt", "completion"]
    return ["prompt"]


def _detect(table: _Table) -> FormatInfo:
    kind, implicit = _kind_from_columns(table.names)
    if kind is DatasetKind.TOKENIZED:
        return FormatInfo(kind, conversational=False)
    key = _sequence_fields(kind, table.names, implicit)[0]
    first = next((v for v in table.column(key) if v is not None and v is not _MISSING), None)
    images = next((c for c in ("images", "image") if c in table.names), None)
    return FormatInfo(kind, conversational=isinstance(first, list), implicit_prompt=implicit, image_column=images)


def detect_format(dataset: Any) -> FormatInfo:
    """Tell a dataset's format from its column names (and, for conversational or not, its first non-null row)."""
    return _detect(_Table(dataset))


def _check_messages(row: int, field: str, value: Any) -> None:
    if not isinstance(value, list):
        raise _fail(row, field, "a list of messages (the dataset is conversational)", value)
    if not value:
        raise _fail(row, field, "a non-empty list of messages", value)
    for j, msg in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(msg, Mapping):
            raise _fail(row, where, "a message dict with 'role' and 'content'", msg)
        role = msg.get("role", _MISSING)
        if role not in ROLES:
            raise _fail(row, f"{where}.role", f"one of {list(ROLES)}", role)
        content = msg.get("content", _MISSING)
        if content is _MISSING or content is None:
            if msg.get("tool_calls"):  # an assistant turn that only calls tools has no content
                continue
            raise _fail(row, f"{where}.content", "a string", content)
        if isinstance(content, list):
            _check_parts(row, f"{where}.content", content)
        elif not isinstance(content, str):
            raise _fail(row, f"{where}.content", "a string or a list of content parts", content)


def _check_parts(row: int, field: str, parts: list) -> None:
    """Content given as parts (vision data): `{"type": "text", "text": str}` or `{"type": "image"}`."""
    for k, part in enumerate(parts):
        where = f"{field}[{k}]"
        if not isinstance(part, Mapping):
            raise _fail(row, where, "a content part dict with a 'type'", part)
        kind = part.get("type", _MISSING)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _fail(row, f"{where}.text", "a string (a text part's text)", part.get("text", _MISSING))
        elif kind != "image":
            raise _fail(row, f"{where}.type", "'text' or 'image' (a content part's type)", kind)


def _check_sequence(row: int, field: str, value: Any, conversational: bool) -> None:
    if conversational:
        if isinstance(value, list):
            _check_messages(row, field, value)
            return
        expected = _SEQ if value is None or value is _MISSING else "a list of messages (the dataset is conversational)"
        raise _fail(row, field, expected, value)
    if not isinstance(value, str):
        plain = "a string (the dataset holds plain text, not conversations)"
        raise _fail(row, field, plain if isinstance(value, list) else _SEQ, value)


def _check_stepwise(row: int, completions: Any, labels: Any) -> None:
    if not isinstance(completions, list) or not completions:
        raise _fail(row, "completions", "a non-empty list of strings (one per step)", completions)
    for j, step in enumerate(completions):
        if not isinstance(step, str):
            raise _fail(row, f"completions[{j}]", "a string", step)
    if not isinstance(labels, list):
        raise _fail(row, "labels", "a list of booleans (one per step)", labels)
    if len(labels) != len(completions):
        raise _fail(row, "labels", f"{len(completions)} labels (one per completion step)", labels)
    for j, label in enumerate(labels):
        if not _is_bool(label):
            raise _fail(row, f"labels[{j}]", "a boolean", label)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or type(value).__name__ in ("int64", "int32")


def _check_tokenized(table: _Table) -> None:
    lengths = []
    for i, ids in enumerate(table.column("input_ids")):
        if not isinstance(ids, list) or not ids or not all(_is_int(t) for t in ids):
            raise _fail(i, "input_ids", "a non-empty list of token ids (ints)", ids)
        lengths.append(len(ids))
    for name in (*TOKEN_MASK_COLUMNS, "labels"):
        if name not in table.names:
            continue
        values = "0 or 1" if name != "labels" else "token ids or -100"
        for i, (value, n) in enumerate(zip(table.column(name), lengths)):
            if value is None or value is _MISSING:
                continue
            if not isinstance(value, list) or len(value) != n:
                raise _fail(i, name, f"a list of {n} values ({values}, one per input_ids token)", value)
            if name != "labels" and any(v not in (0, 1) for v in value):
                raise _fail(i, name, "values 0 or 1", value)


def parse_tools(value: Any) -> list[dict] | None:
    """One row's `tools` value as a chat template wants it: a list of tool-schema dicts, or None.

    Accepts None (or an empty string or list): no tools; a list of dicts; a JSON string of a list of dicts (or of
    one dict). Raises ValueError otherwise.
    """
    if value is None or (isinstance(value, (str, list)) and not value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"the JSON string does not parse: {err}") from None
        if isinstance(value, Mapping):
            value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(t, Mapping) for t in value):
        return [dict(t) for t in value] or None
    raise ValueError(f"not a list of dicts: {type(value).__name__}")


def _check_tools(table: _Table) -> None:
    for i, value in enumerate(table.column("tools")):
        if value is _MISSING:
            continue
        try:
            parse_tools(value)
        except ValueError as err:
            raise _fail(i, "tools", f"a list of tool-schema dicts or a JSON string of one ({err})", value) from None


def _validate_rows(table: _Table, info: FormatInfo) -> None:
    if "tools" in table.names:
        _check_tools(table)
    if info.kind is DatasetKind.TOKENIZED:
        _check_tokenized(table)
        return
    fields = _sequence_fields(info.kind, table.names, info.implicit_prompt)
    for field in fields:
        for i, value in enumerate(table.column(field)):
            _check_sequence(i, field, value, info.conversational)
    _check_images(table, fields)
    if info.kind is DatasetKind.UNPAIRED_PREFERENCE:
        for i, label in enumerate(table.column("label")):
            if not _is_bool(label):
                raise _fail(i, "label", "a boolean (True: desirable completion)", label)
    if info.kind is DatasetKind.STEPWISE:
        for i, (comps, labels) in enumerate(zip(table.column("completions"), table.column("labels"))):
            _check_stepwise(i, comps, labels)
    if info.kind is DatasetKind.PREFERENCE and info.implicit_prompt and info.conversational:
        for i, (chosen, rejected) in enumerate(zip(table.column("chosen"), table.column("rejected"))):
            if not split_implicit_prompt({"chosen": chosen, "rejected": rejected})["prompt"]:
                raise _fail(i, "chosen", "chosen and rejected to share their leading prompt messages", chosen[0])


def _check_images(table: _Table, fields: list[str]) -> None:
    """Vision rows: every image opens and each row has as many images as image parts (see `vision`). A dataset
    with image parts and no image column fails on its first such row."""
    from .images import count_image_parts, image_column, validate_images

    column = image_column(table.names)
    conversations = list(zip(*(table.column(f) for f in fields)))
    if column is None:
        for i, convs in enumerate(conversations):
            if sum(count_image_parts(c) for c in convs):
                raise DatasetFormatError(f"row {i}, field '{fields[0]}': the messages have image parts but the "
                                         "dataset has no 'images' (or 'image') column")
        return
    values = [None if v is _MISSING else v for v in table.column(column)]
    validate_images(values, conversations, column)


def validate_dataset(dataset: Any, accepted: Sequence[DatasetKind] | None = None) -> FormatInfo:
    """Detect the dataset's format, check it is one of `accepted` (all kinds if None) and validate every row.

    Accepts a `datasets.Dataset`, a dict of columns or a list of row dicts. Raises `DatasetFormatError`.
    """
    table = _Table(dataset)
    info = _detect(table)
    if accepted is not None and info.kind not in accepted:
        wanted = "; ".join(f"{DatasetKind(k).value} ({_KIND_COLUMNS[DatasetKind(k)]})" for k in accepted)
        raise DatasetFormatError(
            f"this method accepts {wanted} datasets, but the columns {sorted(table.names)} make a "
            f"{info.kind.value} dataset"
        )
    _validate_rows(table, info)
    return info


def validate_row(row: Mapping[str, Any], info: FormatInfo, index: int) -> None:
    """Check one row (of a stream, as it arrives) against the format `info` found; a bad row raises
    `DatasetFormatError` naming `index` (its position in the stream) and the field."""
    try:
        _validate_rows(_Table([dict(row)]), info)
    except DatasetFormatError as err:
        raise DatasetFormatError(f"row {index}{str(err)[len('row 0'):]}") from None


def _split_text(chosen: str, rejected: str) -> int:
    """Length of the shared prompt of two strings: the common prefix cut back to a word boundary.

    The prompt stops before the whitespace that precedes the first differing word, so the completions start
    with that whitespace (" four" / " five"): that is how a BPE tokenizer splits words, so the prompt's tokens
    are the same whether tokenized alone or joined with a completion.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    while n > 0 and chosen[n - 1].isspace():
        n -= 1
    return n


def split_implicit_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """Split a `chosen`/`rejected` pair without a `prompt` into prompt + the two completions.

    Conversations: the prompt is the leading messages both share (at least one message is left on each side).
    Strings: the shared prefix, cut back to a word boundary (see `_split_text`). Other keys are kept; a row
    that already has a `prompt` is returned as a copy.
    """
    out = dict(row)
    if "prompt" in row:
        return out
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list):
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        out.update(prompt=chosen[:k], chosen=chosen[k:], rejected=rejected[k:])
    else:
        k = _split_text(chosen, rejected)
        out.update(prompt=chosen[:k], chosen=chosen[k:], rejected=rejected[k:])
    return out


def unpair_row(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One preference pair as two unpaired rows, `(prompt, completion=chosen, label=True)` then
    `(prompt, completion=rejected, label=False)`, other keys copied to both; an implicit prompt is split."""
    row = split_implicit_prompt(row)
    extras = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return [{"prompt": row["prompt"], "completion": row[key], "label": label, **extras}
            for key, label in (("chosen", True), ("rejected", False))]


def unpair_preference(dataset: datasets.Dataset) -> datasets.Dataset:
    """Turn a paired preference dataset into unpaired rows (for KTO/BCO).

    Each pair becomes two consecutive rows: `(prompt, completion=chosen, label=True)` and
    `(prompt, completion=rejected, label=False)`; extra columns are copied to both. Implicit prompts are split.
    """
    validate_dataset(dataset, [DatasetKind.PREFERENCE])
    extras = [c for c in dataset.column_names if c not in ("prompt", "chosen", "rejected")]

    def unpair(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "label": [], **{c: [] for c in extras}}
        for i in range(len(batch["chosen"])):
            for row in unpair_row({k: batch[k][i] for k in batch}):
                for key, values in out.items():
                    values.append(row[key])
        return out

    return dataset.map(unpair, batched=True, remove_columns=dataset.column_names, desc="unpair preference")
