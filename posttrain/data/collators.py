"""Collators: a list of tokenized rows -> a batch of tensors, padded or padding-free.

Per-token fields are found generically: any key whose value is a list (or 1-D tensor) as long as the row's
`input_ids`. They are padded (or flattened) along with `input_ids`: `*labels` with -100, everything else
(masks, log-probs, advantages) with 0. Other fields are stacked into a tensor when they are numbers and
passed through as lists otherwise.

Following docs/internals.md, the first token of every sequence is never in a loss mask (it has no prediction):
both collators zero every `*_mask` field (except `attention_mask`) at sequence starts and set `*labels` there
to -100, which in a padding-free row is also what stops a sequence's first label from being predicted by
the previous sequence's last token.

Padding-free and attention isolation: transformers (5.x, eager and SDPA alike) detects packed sequences from
`position_ids` only when no KV cache is passed *or created*; `LlamaModel` creates a `DynamicCache` whenever
`use_cache` is true, which is the config default even in training mode, and then the packed sequences
attend to each other. So a padding-free forward must pass `use_cache=False`. For a path that cannot, set
`PaddingFreeCollator(block_mask=True)` to emit an explicit block-diagonal causal mask instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import torch

from .padding_free import packed_position_ids

_SKIP = ("seq_lens",)


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _per_token_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    keys = []
    for key in rows[0]:
        if key == "input_ids" or key in _SKIP:
            continue
        if all(isinstance(r.get(key), (list, torch.Tensor)) and len(r[key]) == len(r["input_ids"]) for r in rows):
            keys.append(key)
    return keys


def _pad_value(key: str, pad_token_id: int) -> int:
    if key == "input_ids":
        return pad_token_id
    if key == "labels" or key.endswith("_labels"):
        return -100
    return 0


def _is_loss_mask(key: str) -> bool:
    return key.endswith("_mask") and key != "attention_mask"


def _mark_sequence_starts(values: list, key: str, starts: Sequence[int]) -> None:
    if key == "labels" or key.endswith("_labels"):
        for s in starts:
            values[s] = -100
    elif _is_loss_mask(key):
        for s in starts:
            values[s] = 0


def _other_fields(rows: Sequence[Mapping[str, Any]], skip: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        if key in skip:
            continue
        values = [_as_list(r.get(key)) for r in rows]
        if all(isinstance(v, (bool, int, float)) for v in values):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        raise ValueError("cannot collate an empty batch")
    for i, row in enumerate(rows):
        if "input_ids" not in row:
            raise KeyError(f"batch row {i} has no 'input_ids' (keys: {sorted(row)})")


class PaddingCollator:
    """Pad rows to the longest one (rounded up to `pad_to_multiple_of`) on the right or the left.

    Returns `input_ids`, `attention_mask` (1 on real tokens) and every per-token field as `[B, L]` tensors.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_rows(rows)
        keys = ["input_ids", *_per_token_keys(rows)]
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out: dict[str, Any] = {}
        for key in keys:
            pad = _pad_value(key, self.pad_token_id)
            padded = []
            for r in rows:
                values = list(_as_list(r[key]))
                _mark_sequence_starts(values, key, [0])
                fill = [pad] * (width - len(values))
                padded.append(values + fill if self.padding_side == "right" else fill + values)
            out[key] = torch.tensor(padded)
        if "attention_mask" not in keys:
            lengths = [len(r["input_ids"]) for r in rows]
            side = self.padding_side
            out["attention_mask"] = torch.tensor(
                [[1] * n + [0] * (width - n) if side == "right" else [0] * (width - n) + [1] * n for n in lengths]
            )
        out.update(_other_fields(rows, set(keys) | {"attention_mask"}))
        return out


def packed_attention_mask(seq_lens: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive block-diagonal causal mask `[1, 1, T, T]` (0 where attending, dtype min elsewhere) for packed
    sequences of lengths `seq_lens`; transformers uses a 4-D mask as given (eager and SDPA). O(T^2) memory."""
    seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(list(seq_lens)))
    total = int(seq_ids.numel())
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    allowed = causal & (seq_ids[:, None] == seq_ids[None, :])
    mask = torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class PaddingFreeCollator:
    """Flatten a batch into one row `[1, T]`: `input_ids`, `position_ids` (restarting at 0 per sequence),
    `seq_lens` (list of ints) and every per-token field flattened alike; no `attention_mask`.

    Rows that are already packed (with `position_ids` and `seq_lens`, from `pack_dataset`) keep their
    sequences. With `block_mask=True` an explicit `[1, 1, T, T]` block-diagonal causal `attention_mask` is
    added, for forwards that cannot pass `use_cache=False` (see the module docstring). With
    `pad_to_multiple_of`, `T` is rounded up by a trailing segment of `pad_token_id` tokens that is a sequence of
    its own (positions from 0, every other per-token field 0, `labels` -100): nothing attends to it and it is in
    no loss.
    """

    def __init__(self, block_mask: bool = False, mask_dtype: torch.dtype = torch.float32,
                 pad_to_multiple_of: int | None = None, pad_token_id: int = 0):
        self.block_mask = block_mask
        self.mask_dtype = mask_dtype
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_rows(rows)
        keys = [k for k in ["input_ids", *_per_token_keys(rows)] if k not in ("position_ids", "attention_mask")]
        seq_lens: list[int] = []
        for r in rows:
            lens = [int(n) for n in _as_list(r["seq_lens"])] if "seq_lens" in r else [len(r["input_ids"])]
            if sum(lens) != len(r["input_ids"]):
                raise ValueError(f"seq_lens {lens} do not add up to the row's {len(r['input_ids'])} tokens")
            seq_lens.extend(lens)
        total, m = sum(seq_lens), self.pad_to_multiple_of
        pad = (-total % m) if m else 0
        starts = [0, *accumulate(seq_lens)][:-1]
        out: dict[str, Any] = {}
        for key in keys:
            values = [x for r in rows for x in _as_list(r[key])]
            _mark_sequence_starts(values, key, starts)
            if pad:
                fill = self.pad_token_id if key == "input_ids" else -100 if key == "labels" else 0
                values = values + [fill] * pad
            out[key] = torch.tensor([values])
        if pad:
            seq_lens.append(pad)
        out["position_ids"] = torch.tensor([packed_position_ids(seq_lens)])
        out["seq_lens"] = seq_lens
        if self.block_mask:
            out["attention_mask"] = packed_attention_mask(seq_lens, self.mask_dtype)
        out.update(_other_fields(rows, set(keys) | {"position_ids", "seq_lens", "attention_mask"}))
        return out
