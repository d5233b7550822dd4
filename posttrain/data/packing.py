"""Packing: put several tokenized sequences into one row of at most `max_length` tokens.

`pack_bfd` chooses the bins (best-fit decreasing); `pack_dataset` builds the packed rows, with `position_ids`
restarting at 0 for every sequence and `seq_lens`, which is what keeps the sequences apart in attention (see
`collators` and docs/internals.md: a packed forward passes `position_ids`, no `attention_mask`, `use_cache=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets

from .padding_free import packed_position_ids


class _MinFitTree:
    """Counts of open bins per remaining capacity 0..max_length, answering "smallest capacity >= n that has a
    bin" in O(log max_length) (a segment tree over capacities)."""

    def __init__(self, max_length: int):
        self.size = 1
        while self.size < max_length + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)

    def add(self, capacity: int, delta: int) -> None:
        i = capacity + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def smallest_at_least(self, n: int) -> int | None:
        """The smallest capacity c >= n with count > 0, or None."""
        return self._find(1, 0, self.size, n)

    def _find(self, node: int, lo: int, hi: int, n: int) -> int | None:
        if hi <= n or self.count[node] == 0:
            return None
        if hi - lo == 1:
            return lo
        mid = (lo + hi) // 2
        left = self._find(2 * node, lo, mid, n)
        return left if left is not None else self._find(2 * node + 1, mid, hi, n)


def pack_bfd(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of sequence lengths into bins of capacity `max_length`.

    Sequences are placed longest first, each into the open bin with the least room that still fits it (a new
    bin when none does). Returns the bins as lists of indices into `lengths`, in order of creation; every index
    appears exactly once. Lengths must lie in [1, max_length]: the caller truncates longer sequences.
    """
    assert max_length >= 1, f"max_length must be positive, got {max_length}"
    for i, n in enumerate(lengths):
        assert 1 <= n <= max_length, f"sequence {i} has length {n}; expected 1..{max_length} (truncate it first)"
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    tree = _MinFitTree(max_length)
    by_capacity: dict[int, list[int]] = {}  # remaining capacity -> open bins with that room
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        capacity = tree.smallest_at_least(n)
        if capacity is None:
            bins.append([])
            room.append(max_length)
            b = len(bins) - 1
        else:
            b = by_capacity[capacity].pop()
            tree.add(capacity, -1)
        bins[b].append(i)
        room[b] -= n
        if room[b] > 0:
            by_capacity.setdefault(room[b], []).append(b)
            tree.add(room[b], 1)
    return bins


def pack_dataset(
    dataset: datasets.Dataset, max_length: int, columns: Sequence[str] | None = None
) -> datasets.Dataset:
    """Pack a tokenized dataset into rows of at most `max_length` tokens (best-fit decreasing).

    `columns` are the per-token columns to concatenate (default: `input_ids` and every column whose first
    row is a list as long as its `input_ids`). Other columns are dropped. Each packed row also gets
    `position_ids` (restarting at 0 per sequence) and `seq_lens`. A row longer than `max_length` is an error
    (truncate when tokenizing).
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"pack_dataset needs an 'input_ids' column; got {dataset.column_names}")
    table = dataset.with_format("arrow")
    if columns is None:
        first = dataset[0] if len(dataset) else {}
        columns = ["input_ids"] + [
            c for c, v in first.items()
            if c not in ("input_ids", "position_ids", "seq_lens")
            and isinstance(v, list) and len(v) == len(first["input_ids"])
        ]
    elif "input_ids" not in columns:
        columns = ["input_ids", *columns]
    data = {c: table[c].to_pylist() for c in columns}
    lengths = [len(ids) for ids in data["input_ids"]]
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            raise ValueError(f"row {i}, field 'input_ids': expected 1..{max_length} tokens, got {n} (truncate it first)")
        for c in columns:
            if len(data[c][i]) != n:
                raise ValueError(f"row {i}, field '{c}': expected {n} values (one per token), got {len(data[c][i])}")
    return datasets.Dataset.from_dict(_packed_columns(data, lengths, columns, max_length))


def _packed_columns(data: dict[str, list], lengths: list[int], columns: Sequence[str],
                    max_length: int) -> dict[str, list]:
    """Columns of the packed rows (best-fit decreasing) of `data`'s rows, with `position_ids` and `seq_lens`."""
    out: dict[str, list] = {c: [] for c in columns}
    out["position_ids"], out["seq_lens"] = [], []
    for bin_ in pack_bfd(lengths, max_length):
        for c in columns:
            out[c].append([x for i in bin_ for x in data[c][i]])
        out["position_ids"].append(packed_position_ids([lengths[i] for i in bin_]))
        out["seq_lens"].append([lengths[i] for i in bin_])
    return out


def pack_rows(rows: Sequence[dict[str, Any]], max_length: int, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Pack tokenized rows (dicts holding every one of `columns`, `input_ids` first, each no longer than
    `max_length`) into packed rows, as `pack_dataset` does for a whole dataset: the streaming path packs a
    bounded buffer of rows at a time with it."""
    data = {c: [row[c] for row in rows] for c in columns}
    out = _packed_columns(data, [len(ids) for ids in data["input_ids"]], columns, max_length)
    return [dict(zip(out, values)) for values in zip(*out.values())]


def _per_token_columns(dataset: datasets.Dataset) -> list[str]:
    first = dataset[0] if len(dataset) else {}
    return ["input_ids"] + [c for c, v in first.items() if c not in ("input_ids", "position_ids", "seq_lens")
                            and isinstance(v, list) and len(v) == len(first["input_ids"])]


def split_long_rows(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Rows longer than `max_length` cut into consecutive pieces of at most `max_length` tokens, each its own row
    (TRL's ``packing_strategy="bfd_split"`` packs these pieces instead of truncating the overflow)."""
    columns = _per_token_columns(dataset)
    table = dataset.with_format("arrow")
    data = {c: table[c].to_pylist() for c in columns}
    out: dict[str, list] = {c: [] for c in columns}
    for i, ids in enumerate(data["input_ids"]):
        for start in range(0, max(len(ids), 1), max_length):
            for c in columns:
                out[c].append(data[c][i][start:start + max_length])
    return datasets.Dataset.from_dict(out)


def pack_wrapped(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Every row concatenated in order and the stream cut into rows of exactly `max_length` tokens (the last one
    shorter), sequences split across rows where the cut falls (TRL's ``packing_strategy="wrapped"``). Each row keeps
    per-sequence `position_ids` and `seq_lens`: the part of a sequence that starts a row restarts at position 0."""
    columns = _per_token_columns(dataset)
    table = dataset.with_format("arrow")
    data = {c: table[c].to_pylist() for c in columns}
    out: dict[str, list] = {c: [] for c in columns}
    out["position_ids"], out["seq_lens"] = [], []
    current: dict[str, list] = {c: [] for c in columns}
    lens: list[int] = []

    def flush() -> None:
        for c in columns:
            out[c].append(current[c][:])
            current[c].clear()
        out["position_ids"].append(packed_position_ids(lens))
        out["seq_lens"].append(lens[:])
        lens.clear()

    for i in range(len(data["input_ids"])):
        start, n = 0, len(data["input_ids"][i])
        while start < n:
            take = min(n - start, max_length - len(current["input_ids"]))
            for c in columns:
                current[c].extend(data[c][i][start:start + take])
            lens.append(take)
            start += take
            if len(current["input_ids"]) == max_length:
                flush()
    if current["input_ids"]:
        flush()
    return datasets.Dataset.from_dict(out)
