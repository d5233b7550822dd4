"""Streaming datasets: `IterableDataset` train and eval data, validated and tokenized row by row as it arrives.

A stream has no length and is never held whole, so what `prepare_dataset` does for a `datasets.Dataset` happens
per row here, in `TokenizedStream`, in the same order: the format is told from the first row (`stream_format`,
in the main process, before training starts), then every row is checked as it arrives (`validate_row`: a bad
row raises `DatasetFormatError` with its index in the stream and the field, before it reaches a batch), turned
into zero or more rows by the trainer's `expand` (an implicit prompt split, a pair unpaired), tokenized, and
dropped when it has nothing to train on (counted). SFT packing packs a bounded buffer of rows at a time, so
memory stays flat however long the stream.

Counts (truncated rows, dropped rows) are kept in the trainer's totals as the rows pass, in the process that
iterates the stream (with ``dataloader_num_workers > 0`` the workers keep their own, and they are not reported).

Resuming: the rows are a deterministic function of the source, so a resumed run skips what was consumed. The
Trainer skips the batches already trained on; `StreamPrompts` (the online methods' prompt source) skips the
prompts already drawn, without tokenizing them again.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import torch

from .formats import DatasetFormatError, DatasetKind, FormatInfo, validate_dataset, validate_row
from .packing import pack_rows

logger = logging.getLogger(__name__)

__all__ = ["StreamPrompts", "TokenizedStream", "is_stream", "require_max_steps", "stream_format"]

#: Counted per stream: (flag a tokenized row carries, whether it is removed from the row, total's suffix)
_FLAGS = (("truncated", True, "truncated_rows"), ("prompt_truncated", False, "truncated_prompts"))


def is_stream(dataset: Any) -> bool:
    """Whether `dataset` is a stream: a `datasets.IterableDataset` or any `torch.utils.data.IterableDataset`."""
    return isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset))


def require_max_steps(max_steps: int, name: str) -> None:
    """A stream has no length, so the number of steps cannot come from epochs: `max_steps` must be set."""
    if max_steps is None or max_steps <= 0:
        raise ValueError(f"{name}: a streamed dataset (IterableDataset) has no length, so training cannot be "
                         "counted in epochs: set max_steps to a positive number of optimizer steps")


def stream_format(dataset: Iterable[Mapping[str, Any]], accepted: Sequence[DatasetKind] | None,
                  name: str = "train", format_row: Callable[[dict, int], dict] | None = None) -> FormatInfo:
    """The format of a stream, told from its first row (which is also validated; `format_row` applied first),
    once, in the caller's process: every row is then checked and tokenized against this one `FormatInfo`."""
    first = next(iter(dataset), None)
    if first is None:
        raise DatasetFormatError(f"{name}: the streamed dataset is empty")
    first = dict(first) if format_row is None else format_row(dict(first), 0)
    return validate_dataset([first], accepted)


Row = dict[str, Any]


class TokenizedStream(torch.utils.data.IterableDataset):
    """A stream of rows validated, expanded, tokenized, filtered and (optionally) packed as they arrive.

    `format_row(row) -> row` is applied to every source row before it is validated (SFT's `formatting_func`
    and `dataset_text_field`); `tokenize(row, info) -> dict` is the trainer's `tokenize_row`; `expand(row) -> list[row]` rewrites one
    source row into the rows to tokenize (default: itself); `keep(tokenized) -> bool` says whether a row has
    something to train on; `window(rows) -> rows` rewrites each bounded window of `window_size` tokenized rows
    (KTO's mismatched completions); `pack_length` packs each window of `pack_buffer` rows (best-fit decreasing)
    into rows of at most that many tokens. `totals` receives the counts under ``data/<name>/...``.
    """

    column_names: list[str] = []  # no column is known ahead (an online trainer's length checks skip streams)

    def __init__(self, source: Iterable[Mapping[str, Any]], info: FormatInfo, tokenize: Callable[[Row, FormatInfo], Row],
                 *, name: str, totals: dict[str, float], format_row: Callable[[Row, int], Row] | None = None,
                 expand: Callable[[Row], list[Row]] | None = None,
                 keep: Callable[[Row], bool] | None = None, window: Callable[[list[Row]], list[Row]] | None = None,
                 window_size: int = 64, pack_length: int | None = None, pack_buffer: int = 1024,
                 pack_columns: Sequence[str] = ("input_ids", "completion_mask")) -> None:
        self.source, self.info, self.tokenize, self.name, self.totals = source, info, tokenize, name, totals
        self.format_row = format_row
        self.expand, self.keep, self.window, self.window_size = expand, keep, window, window_size
        self.pack_length, self.pack_buffer, self.pack_columns = pack_length, pack_buffer, tuple(pack_columns)
        for suffix in ("truncated_rows", "empty_rows"):
            totals.setdefault(self._key(suffix), 0.0)
        self._warned: set[str] = set()

    def _key(self, suffix: str) -> str:
        return f"data/{self.name}/{suffix}"

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the source (a shuffled `datasets.IterableDataset` reshuffles per epoch)."""
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def rows(self, start: int = 0) -> Iterator[Row]:
        """The tokenized rows, from source row `start` on (the rows before it are skipped untouched)."""
        for index, row in enumerate(itertools.islice(self.source, start, None), start):
            if self.format_row is not None:
                row = self.format_row(dict(row), index)
            validate_row(row, self.info, index)
            for part in self.expand(dict(row)) if self.expand is not None else (dict(row),):
                out = self.tokenize(part, self.info)
                for flag, remove, suffix in _FLAGS:
                    if flag in out:
                        self._count(suffix, bool(out.pop(flag) if remove else out[flag]), index)
                if self.keep is not None and not self.keep(out):
                    self._count("empty_rows", True, index)
                    continue
                yield out

    def _count(self, suffix: str, hit: bool, index: int) -> None:
        key = self._key(suffix)
        self.totals[key] = self.totals.get(key, 0.0) + float(hit)
        if hit and suffix not in self._warned:  # once per kind: the totals hold the running counts
            self._warned.add(suffix)
            what = "has nothing to train on and is dropped" if suffix == "empty_rows" else "is truncated"
            logger.warning("%s: streamed row %d %s (further ones are counted in %s)", self.name, index, what, key)

    def __iter__(self) -> Iterator[Row]:
        rows = self.rows()
        if self.window is not None:
            rows = (r for chunk in _chunks(rows, self.window_size) for r in self.window(chunk))
        if self.pack_length is None:
            return rows
        return (r for chunk in _chunks(rows, self.pack_buffer)
                for r in pack_rows(chunk, self.pack_length, self.pack_columns))


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


class StreamPrompts:
    """The online methods' prompt source over a stream (`PromptStream`'s interface): this process's next
    ``per_process`` prompts from each chunk of ``per_process * num_processes``, in stream order (shuffle the
    source, e.g. `IterableDataset.shuffle(seed, buffer_size)`, for a random order). An exhausted stream starts
    again (a new epoch). `load_state_dict` skips the prompts already drawn without tokenizing them."""

    chunks_per_epoch = 1 << 40  # unknown: training is bounded by max_steps

    def __init__(self, stream: TokenizedStream, per_process: int, num_processes: int = 1,
                 process_index: int = 0) -> None:
        if per_process < 1:
            raise ValueError(f"per_process={per_process}: expected >= 1")
        self.stream, self.per_process = stream, per_process
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch, self.position = 0, 0  # position: source rows consumed in this epoch
        self._rows: Iterator[Row] | None = None

    def _iterator(self) -> Iterator[Row]:
        if self._rows is None:
            self.stream.set_epoch(self.epoch)
            self._rows = self.stream.rows(self.position)
        return self._rows

    def next_rows(self) -> list[dict]:
        chunk = self.per_process * self.num_processes
        rows = list(itertools.islice(self._iterator(), chunk))
        if len(rows) < chunk:  # the end of the stream: an incomplete last chunk is dropped, as PromptStream does
            if self.position == 0:
                raise DatasetFormatError(f"{self.stream.name}: the streamed dataset has {len(rows)} prompts, fewer "
                                         f"than one generation batch of {chunk}")
            self.epoch, self.position, self._rows = self.epoch + 1, 0, None
            return self.next_rows()
        self.position += chunk
        start = self.process_index * self.per_process
        return rows[start:start + self.per_process]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._rows = int(state["epoch"]), int(state["position"]), None
