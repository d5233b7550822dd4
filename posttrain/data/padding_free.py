"""The padding-free layout, built in one place: several sequences in one row ``[1, T]``.

docs/internals.md's contract: the sequences are concatenated with no padding between them, ``position_ids``
restart at 0 for every sequence (which is what keeps the sequences apart in attention, see
`posttrain.data.collators`), and ``seq_lens`` lists their lengths. Everything that lays sequences out this
way uses these two functions: `pack_dataset` and `PaddingFreeCollator` (`packed_position_ids`), the
preference trainers' `SequenceCollator` and the online log-probs (`padding_free_row`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

__all__ = ["PaddingFreeRow", "packed_position_ids", "padding_free_row"]


def packed_position_ids(seq_lens: Sequence[int]) -> list[int]:
    """Positions of a padding-free row of sequences of lengths ``seq_lens``: ``0..n-1`` for each, concatenated."""
    return [p for n in seq_lens for p in range(n)]


@dataclass
class PaddingFreeRow:
    """One padding-free row of prompt+completion sequences (every tensor ``[1, width]``).

    ``completion_mask`` (bool) is set on completion tokens; ``seq_index`` (long) gives each token's sequence,
    -1 on trailing padding; ``seq_lens`` the sequences' lengths (trailing padding not included).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    completion_mask: torch.Tensor
    seq_index: torch.Tensor
    seq_lens: list[int]


def padding_free_row(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    width: int | None = None,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
) -> PaddingFreeRow:
    """Lay ``prompt_ids[i] + completion_ids[i]`` out one after the other in a row ``[1, T]``.

    ``width`` (default: the total length ``T``) pads the row on the right with ``pad_token_id``; the padding
    forms a segment of its own (its positions restart at 0, ``seq_index`` -1, never in the completion mask),
    so it attends to no real token.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    seq_lens = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    total = sum(seq_lens)
    width = total if width is None else width
    if width < total:
        raise ValueError(f"width={width} is shorter than the {total} tokens of the sequences")
    tail = width - total
    lens = torch.tensor(seq_lens, dtype=torch.long)
    seq_index = torch.repeat_interleave(torch.arange(len(seq_lens)), lens)
    position_ids = torch.tensor(packed_position_ids(seq_lens + [tail]), dtype=torch.long)
    prompt_lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    completion = position_ids[:total] >= prompt_lens[seq_index]
    input_ids = torch.tensor(list(chain.from_iterable(chain(p, c) for p, c in zip(prompt_ids, completion_ids)))
                             + [pad_token_id] * tail, dtype=torch.long)
    return PaddingFreeRow(
        input_ids=input_ids[None].to(device),
        position_ids=position_ids[None].to(device),
        completion_mask=torch.cat([completion, completion.new_zeros(tail)])[None].to(device),
        seq_index=torch.cat([seq_index, seq_index.new_full((tail,), -1)])[None].to(device),
        seq_lens=seq_lens,
    )
