"""Dataset mixtures: several sources, each with its own path/name, split, columns and weight or count,
validated one by one and interleaved with a seed into one training set.

In a YAML run file (the `datasets:` key, as TRL's CLI has it; `dataset_mixture_seed` and `dataset_streaming`
beside it)::

    datasets:
      - path: data/math.jsonl            # a file, folder or hub name (anything `load_any` takes)
        weight: 3
      - path: org/chat-data              # a hub dataset
        name: default                    # its configuration
        split: train
        columns: [prompt, completion]    # keep these (or a mapping {old: new} to rename)
        weight: 1
      - path: data/gold.jsonl
        count: 500                       # exactly 500 of its rows

and in Python: ``mix_datasets([DatasetSource("a.jsonl", weight=3), DatasetSource("b.jsonl", weight=1)], seed=0)``.

How rows are drawn (in memory): a source with `count` gives exactly that many of its rows; a source with neither
weight nor count gives all of its rows; the sources with a `weight` share the rest in proportion to their
weights (exact counts, rounded), as many as the scarcest of them allows without repeating a row (or
`num_rows` in all, when given). Each source's rows are drawn from a seeded shuffle of it, and the drawn rows are
interleaved in a seeded random order. Streamed (`streaming=True`): every source is streamed and the sources are
interleaved at random in proportion to their weights (`datasets.interleave_datasets`), until the first one runs
out; `count` takes that source's first rows.

Every source is validated on its own before mixing (a bad row names its source, row and field), all sources must
share one format (conversational or not included), and `MixtureReport` says what each source gave (also logged).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import datasets

from .formats import DatasetFormatError, DatasetKind, FormatInfo, validate_dataset
from .loading import load_any
from .streaming import stream_format

logger = logging.getLogger(__name__)

__all__ = ["DatasetSource", "MixtureReport", "mix_datasets"]


@dataclass
class DatasetSource:
    """One source of a mixture (see the module docstring)."""

    path: str
    name: str | None = None  # a hub dataset's configuration
    split: str = "train"
    columns: list[str] | dict[str, str] | None = None  # keep (list) or rename-and-keep (mapping) these columns
    weight: float | None = None
    count: int | None = None
    data_files: str | list[str] | None = None  # for a hub or builder path, as datasets.load_dataset takes them

    def __post_init__(self) -> None:
        if self.weight is not None and self.count is not None:
            raise ValueError(f"dataset source {self.path!r}: give weight or count, not both")
        if self.weight is not None and not self.weight > 0:
            raise ValueError(f"dataset source {self.path!r}: weight must be > 0, got {self.weight}")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"dataset source {self.path!r}: count must be a positive integer, got {self.count!r}")

    @classmethod
    def from_any(cls, value: Any) -> DatasetSource:
        """A source from a `DatasetSource`, a mapping of its fields (a YAML entry) or a path string."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(path=value)
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"dataset source {dict(value)!r}: unknown field(s) {unknown}; expected {sorted(known)}")
            if "path" not in value:
                raise ValueError(f"dataset source {dict(value)!r}: 'path' is required")
            return cls(**dict(value))
        raise TypeError(f"a dataset source is a mapping with 'path' (and name, split, columns, weight or count) or "
                        f"a path, got {type(value).__name__}")

    def label(self, index: int) -> str:
        return f"source {index} ({self.path}{f' [{self.name}]' if self.name else ''}, split {self.split})"


@dataclass
class MixtureReport:
    """What each source of a mixture gave: its label, rows available (None when streamed), rows drawn (None
    when streamed: drawn as training reads), and its format."""

    sources: list[dict[str, Any]] = field(default_factory=list)

    def log(self) -> None:
        for s in self.sources:
            logger.info("dataset mixture: %s: %s rows drawn of %s (%s)", s["source"], s["drawn"], s["available"],
                        s["format"])


def _load(source: DatasetSource, streaming: bool) -> Any:
    kwargs: dict[str, Any] = {}
    if source.name:
        kwargs["name"] = source.name
    if source.data_files is not None:
        kwargs["data_files"] = source.data_files
    if streaming:
        kwargs["streaming"] = True
    dataset = load_any(source.path, split=source.split, **kwargs)
    if streaming and isinstance(dataset, datasets.Dataset):  # rows or a Dataset given in Python
        dataset = dataset.to_iterable_dataset()
    if source.columns is not None:
        rename = dict(source.columns) if isinstance(source.columns, Mapping) else {c: c for c in source.columns}
        names = dataset.column_names  # None for a stream whose columns are not known ahead
        missing = [c for c in rename if names is not None and c not in names]
        if missing:
            raise DatasetFormatError(f"columns {missing} not found (it has {sorted(names)})")
        dataset = dataset.select_columns(list(rename))
        renames = {k: v for k, v in rename.items() if k != v}
        if renames:
            dataset = dataset.rename_columns(renames)
    return dataset


def _weighted_counts(weights: Sequence[float], sizes: Sequence[int], total: int | None) -> list[int]:
    """Rows per weighted source: in proportion to the weights, as many as the scarcest source allows (or
    `total`), largest remainders rounded up so the counts add up."""
    share = [w / sum(weights) for w in weights]
    n = total if total is not None else int(min(size / s for size, s in zip(sizes, share)) + 1e-9)
    exact = [n * s for s in share]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mix_datasets(sources: Sequence[DatasetSource | Mapping[str, Any] | str], seed: int = 0, *,
                 num_rows: int | None = None, streaming: bool = False,
                 accepted: Sequence[DatasetKind] | None = None) -> datasets.Dataset | datasets.IterableDataset:
    """One dataset drawn from several sources (see the module docstring); `accepted` restricts the formats.
    What each source gave is logged; `mix_with_report` also returns it."""
    return mix_with_report(sources, seed, num_rows=num_rows, streaming=streaming, accepted=accepted)[0]


def mix_with_report(sources: Sequence[DatasetSource | Mapping[str, Any] | str], seed: int = 0, *,
                    num_rows: int | None = None, streaming: bool = False,
                    accepted: Sequence[DatasetKind] | None = None) -> tuple[Any, MixtureReport]:
    """`mix_datasets`, also returning the `MixtureReport`."""
    specs = [DatasetSource.from_any(s) for s in sources]
    if not specs:
        raise ValueError("a dataset mixture needs at least one source")
    loaded, infos = [], []
    for i, spec in enumerate(specs):
        try:
            data = _load(spec, streaming)
            info = stream_format(data, accepted) if streaming else validate_dataset(data, accepted)
        except (DatasetFormatError, ValueError, FileNotFoundError) as err:
            raise type(err)(f"{spec.label(i)}: {err}") from None
        loaded.append(data)
        infos.append(info)
    for i, info in enumerate(infos[1:], 1):
        if info != infos[0]:
            raise DatasetFormatError(f"{specs[i].label(i)} holds {_describe(info)} rows but {specs[0].label(0)} "
                                     f"holds {_describe(infos[0])}: a mixture's sources must share one format")
    mixed, drawn = (_mix_streams if streaming else _mix_in_memory)(specs, loaded, seed, num_rows)
    report = MixtureReport([{"source": spec.label(i), "available": None if streaming else len(loaded[i]),
                             "drawn": drawn[i], "format": _describe(infos[i])} for i, spec in enumerate(specs)])
    report.log()
    return mixed, report


def _describe(info: FormatInfo) -> str:
    return f"{info.kind.value}{', conversational' if info.conversational else ''}"


def _mix_in_memory(specs: list[DatasetSource], loaded: list[datasets.Dataset], seed: int,
                   num_rows: int | None) -> tuple[datasets.Dataset, list[int]]:
    counts = [spec.count if spec.count is not None else len(data) for spec, data in zip(specs, loaded)]
    for i, (spec, data) in enumerate(zip(specs, loaded)):
        if spec.count is not None and spec.count > len(data):
            raise ValueError(f"{spec.label(i)}: count={spec.count} but it has {len(data)} rows")
    weighted = [i for i, spec in enumerate(specs) if spec.weight is not None]
    if weighted:
        rest = None if num_rows is None else num_rows - sum(c for i, c in enumerate(counts) if i not in weighted)
        if rest is not None and rest < 0:
            raise ValueError(f"num_rows={num_rows} is fewer than the rows the sources with a count (or neither) give")
        shares = _weighted_counts([specs[i].weight for i in weighted], [len(loaded[i]) for i in weighted], rest)
        for i, n in zip(weighted, shares):
            if n > len(loaded[i]):
                raise ValueError(f"{specs[i].label(i)}: its weight asks for {n} rows but it has {len(loaded[i])}")
            counts[i] = n
    picked = [data.shuffle(seed=seed + i).select(range(n)) if n < len(data) else data
              for i, (data, n) in enumerate(zip(loaded, counts))]
    features = picked[0].features
    try:
        aligned = [p if p.features == features else p.cast(features) for p in picked]
    except (ValueError, TypeError) as err:
        raise DatasetFormatError(f"the sources' columns do not line up ({err}); pick the same columns in each "
                                 "(`columns:`)") from None
    order = [i for i, n in enumerate(counts) for _ in range(n)]
    random.Random(seed).shuffle(order)
    offsets = [0] * len(counts)
    for i in range(1, len(counts)):
        offsets[i] = offsets[i - 1] + counts[i - 1]
    next_row = list(offsets)
    indices = []
    for i in order:
        indices.append(next_row[i])
        next_row[i] += 1
    return datasets.concatenate_datasets(aligned).select(indices), counts


def _mix_streams(specs: list[DatasetSource], loaded: list[Any], seed: int,
                 num_rows: int | None) -> tuple[datasets.IterableDataset, list[None]]:
    streams = [data.take(spec.count) if spec.count is not None else data for spec, data in zip(specs, loaded)]
    weights = [spec.weight if spec.weight is not None else 1.0 for spec in specs]
    mixed = datasets.interleave_datasets(streams, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                         stopping_strategy="first_exhausted")
    if num_rows is not None:
        mixed = mixed.take(num_rows)
    return mixed, [None] * len(specs)
