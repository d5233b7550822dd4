"""A scored generation batch, its split into micro-batches, and the prompt sampler that feeds it.

Online trainers generate once for a *generation batch* and then take several micro-batches (and, with
``num_iterations > 1``, several passes) from it. `RolloutBatch` holds everything the loss needs per
completion as ``[N, Lc]`` tensors (completion tokens left-aligned); `RolloutBatch.split` shuffles and cuts
it into micro-batches, each trimmed to its own longest completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch.utils.data import Sampler

_TENSORS = ("completion_mask", "old_logps", "ref_logps", "sampler_logps")


@dataclass
class RolloutBatch:
    """Per-completion training inputs.

    ``completion_mask`` ``[N, Lc]`` (float) marks the tokens that count in the loss (all zero for a
    completion excluded by ``mask_truncated_completions``); ``advantages`` ``[N]``; the log-prob tensors
    ``[N, Lc]`` are the policy's at generation time (``old_logps``, when a batch is reused after the policy
    moved), the reference policy's, and the sampler's (for importance-sampling correction).
    ``dapo_denominator`` is the token count ``loss_type="dapo"`` normalizes by (see the trainer).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    dapo_denominator: float | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_loss_tokens(self) -> float:
        return float(self.completion_mask.sum())

    def select(self, index: list[int]) -> "RolloutBatch":
        """The completions at ``index`` (in that order), trimmed to their longest completion."""
        width = max([len(self.completion_ids[i]) for i in index] + [1])
        idx = torch.tensor(index, dtype=torch.long)
        tensors = {}
        for name in _TENSORS:
            value = getattr(self, name)
            tensors[name] = None if value is None else value[idx][:, :width]
        return replace(
            self,
            prompt_ids=[self.prompt_ids[i] for i in index],
            completion_ids=[self.completion_ids[i] for i in index],
            advantages=self.advantages[idx],
            extra={k: [v[i] for i in index] for k, v in self.extra.items()},
            **tensors,
        )

    def split(self, num_chunks: int, generator: torch.Generator | None = None, shuffle: bool = True) -> list["RolloutBatch"]:
        """``num_chunks`` micro-batches of (nearly) equal size, after a seeded shuffle of the completions."""
        n = len(self)
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        bounds = [round(k * n / num_chunks) for k in range(num_chunks + 1)]
        return [self.select(order[bounds[k] : bounds[k + 1]]) for k in range(num_chunks)]


class RepeatedChunkSampler(Sampler[int]):
    """Prompt indices for online training: shuffled chunks of ``chunk_size`` prompts, each chunk repeated
    ``repeats`` times in a row.

    The trainer's data loader takes ``chunk_size / num_processes`` prompts per batch, so each process sees
    its share of a chunk ``repeats`` times: it generates on the first and trains on the others from its
    buffer (``repeats = steps_per_generation * num_iterations`` micro-steps per generation). An incomplete
    last chunk is dropped. Each pass (``__iter__``) reshuffles with ``seed + epoch``.
    """

    def __init__(self, num_rows: int, chunk_size: int, repeats: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if chunk_size < 1 or repeats < 1:
            raise ValueError(f"chunk_size and repeats must be >= 1, got {chunk_size}, {repeats}")
        if num_rows < chunk_size:
            raise ValueError(f"the dataset has {num_rows} prompts, fewer than one generation batch of {chunk_size}")
        self.num_rows, self.chunk_size, self.repeats = num_rows, chunk_size, repeats
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def __len__(self) -> int:
        return (self.num_rows // self.chunk_size) * self.chunk_size * self.repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=gen).tolist()
        else:
            order = list(range(self.num_rows))
        self.epoch += 1
        for start in range(0, len(order) - self.chunk_size + 1, self.chunk_size):
            chunk = order[start : start + self.chunk_size]
            for _ in range(self.repeats):
                yield from chunk
