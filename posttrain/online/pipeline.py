"""The online loop as a pipeline: ``rollout -> score -> prepare -> train``, with typed values between stages.

::

    prompts --rollout--> Rollout --score--> ScoredRollout --prepare--> RolloutBatch --split--> micro-batches --train
             (engine)              (rewards, judges,         (old/ref/sampler log-probs,
                                    teachers)                 values, advantages)

The stages are methods of `posttrain.trainers._online.OnlineTrainer`; a method overrides the ones it
changes. This module holds the values that travel between them and what drives them:

- `PromptStream`: this process's prompts, one generation's worth at a time, from a seeded, endless
  sequence of epochs (so refills and async producers never run dry at an epoch boundary).
- `RolloutLoader`: what the Trainer iterates over instead of a data loader. For each generation it asks
  its *source* for a `ScoredRollout` (synchronously: generate and score now; asynchronously: take the
  next one a producer made ahead of time), lets the trainer prepare it, splits it into
  ``steps_per_generation`` micro-batches of whole groups and yields them ``num_iterations`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch

from .engines import Rollout
from .rollout_batch import RolloutBatch

if TYPE_CHECKING:
    from .rewards import RewardBatch

__all__ = ["ScoredRollout", "PromptStream", "RolloutSource", "RolloutLoader"]


@dataclass
class ScoredRollout:
    """Completions grouped by prompt, with their scores: what the producer hands to the consumer.

    ``rows`` are the dataset rows of the prompts (``rollout.prompt_index[j]`` indexes them);
    ``completions[j]`` is completion j as reward functions see it (its text, or ``[{"role":
    "assistant", "content": text}]`` for a conversational prompt); ``rewards`` the reward functions'
    scores (``None`` when the method scores otherwise); ``scores`` any other named tensors a scorer
    produced (``[N]`` or ``[N, Lc]``, e.g. a judge's preferences or a teacher's per-token log-probs);
    ``weight_version`` the policy version the engine sampled with; ``metrics`` what the producer measured.
    """

    rows: list[dict]
    rollout: Rollout
    completions: list[Any]
    rewards: "RewardBatch | None" = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rollout)

    @property
    def prompts(self) -> list[Any]:
        """Completion j's prompt, as the dataset gave it."""
        return [self.rows[k]["prompt"] for k in self.rollout.prompt_index]

    @property
    def group_size(self) -> int:
        """Completions per prompt in this rollout (``num_generations``, or ``num_generations_eval`` at eval)."""
        return len(self.rollout) // max(len(self.rows), 1)

    @property
    def group_ids(self) -> torch.Tensor:
        """``[N]``: completions of one prompt share an id."""
        return torch.tensor(self.rollout.prompt_index, dtype=torch.long)

    def columns(self) -> dict[str, list]:
        """The prompts' other dataset columns, one entry per completion (what reward functions get as kwargs)."""
        skip = ("prompt", "prompt_ids", "prompt_truncated")
        return {key: [self.rows[k][key] for k in self.rollout.prompt_index] for key in self.rows[0] if key not in skip}

    def select_groups(self, keep: list[int]) -> "ScoredRollout":
        """The prompts whose index is in ``keep`` (with all their completions), renumbered from 0."""
        keep_set = set(keep)
        picked = [j for j, k in enumerate(self.rollout.prompt_index) if k in keep_set]
        renumber = {k: i for i, k in enumerate(sorted(keep_set))}
        r = self.rollout
        rollout = r.select(picked, [renumber[r.prompt_index[j]] for j in picked])
        rewards = None if self.rewards is None else self.rewards.select(picked)
        idx = torch.tensor(picked, dtype=torch.long)
        return ScoredRollout([self.rows[k] for k in sorted(keep_set)], rollout, [self.completions[j] for j in picked],
                             rewards, {k: v[idx] for k, v in self.scores.items()}, self.weight_version, dict(self.metrics))

    @classmethod
    def concat(cls, parts: list["ScoredRollout"]) -> "ScoredRollout":
        """One scored rollout from several (prompts renumbered; rewards and scores concatenated)."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        rows, index, offset = [], [], 0
        for p in parts:
            rows += p.rows
            index += [k + offset for k in p.rollout.prompt_index]
            offset += len(p.rows)
        rollout = Rollout.concat([p.rollout for p in parts], index)
        rewards = None
        if parts[0].rewards is not None:
            rewards = type(parts[0].rewards).concat([p.rewards for p in parts])
        scores = {}
        for name in parts[0].scores:
            chunks = [p.scores[name] for p in parts]
            if chunks[0].dim() == 2:
                width = max(c.shape[1] for c in chunks)
                chunks = [torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks]
            scores[name] = torch.cat(chunks)
        return cls(rows, rollout, [c for p in parts for c in p.completions], rewards, scores,
                   min(p.weight_version for p in parts), {})


class PromptStream:
    """This process's prompt rows, ``per_process`` at a time, from a seeded endless sequence of epochs.

    Each epoch is a permutation of the dataset (seed ``seed + epoch``, the same on every process), cut into
    chunks of ``per_process * num_processes`` prompts (an incomplete last chunk is dropped); process ``p``
    takes slice ``p`` of each chunk. `state_dict` / `load_state_dict` make a resumed run continue where
    the interrupted one stopped.
    """

    def __init__(self, dataset: Any, per_process: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        chunk = per_process * num_processes
        if per_process < 1:
            raise ValueError(f"per_process={per_process}: expected >= 1")
        if len(dataset) < chunk:
            raise ValueError(f"the dataset has {len(dataset)} prompts, fewer than one generation batch of {chunk} "
                             f"({per_process} prompts per process x {num_processes} processes)")
        self.dataset, self.per_process, self.num_processes = dataset, per_process, num_processes
        self.process_index, self.seed, self.shuffle = process_index, seed, shuffle
        self.epoch, self.position = 0, 0  # position: chunks taken in this epoch
        self.chunks_per_epoch = len(dataset) // chunk
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                self._order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
            else:
                self._order = list(range(n))
        return self._order

    def next_indices(self) -> list[int]:
        """Dataset indices of this process's next ``per_process`` prompts."""
        if self.position >= self.chunks_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        chunk = self.per_process * self.num_processes
        start = self.position * chunk + self.process_index * self.per_process
        self.position += 1
        return self._epoch_order()[start:start + self.per_process]

    def next_rows(self) -> list[dict]:
        return [self.dataset[i] for i in self.next_indices()]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class RolloutSource(Protocol):
    """Where generations come from: `next` returns the scored rollout of generation ``index`` (``refill``
    counts the extra rounds dynamic sampling asks for). Synchronous sources generate on the call;
    asynchronous ones return what a producer made ahead of time."""

    def next(self, index: int, refill: int = 0) -> ScoredRollout: ...

    def close(self) -> None: ...


class RolloutLoader:
    """The train "data loader" of an online trainer: micro-batches of prepared rollouts.

    ``generations_per_epoch`` generations make an epoch; each becomes ``steps_per_generation``
    micro-batches, yielded ``num_iterations`` times (micro-batches 0..S-1, then again). ``make_batch(index)``
    is the trainer's `_next_generation`: source, (dynamic sampling), prepare. A resumed run continues at the
    restored step: the micro-batches the Trainer skips are yielded as ``None`` placeholders without
    generating (see `skip_first_batches` in the Trainer), and the prompt stream is restored from the checkpoint.
    """

    # the attributes transformers/accelerate read off a data loader (e.g. to skip batches on resume)
    batch_size = None
    drop_last = False
    num_workers = 0
    prefetch_factor = None
    persistent_workers = False
    pin_memory = False
    timeout = 0
    worker_init_fn = None
    multiprocessing_context = None
    collate_fn = staticmethod(lambda x: x)

    def __init__(self, make_batch: Any, generations_per_epoch: int, steps_per_generation: int,
                 num_iterations: int, generator: torch.Generator, start_micro_step: Any = None) -> None:
        self.make_batch = make_batch
        self.generations_per_epoch = generations_per_epoch
        self.steps_per_generation, self.num_iterations = steps_per_generation, num_iterations
        self.generator = generator
        self.start_micro_step = start_micro_step or (lambda: 0)
        self.micro_batches_per_generation = steps_per_generation * num_iterations
        self.dataset = _IterableView(self)
        self.last_generation: list[RolloutBatch] = []
        self.prompt_states: dict[int, dict] = {}  # generation index -> the prompt stream's state before it
        self.generations = 0  # made so far (over epochs; the seed index of the next one)

    def __len__(self) -> int:
        return self.generations_per_epoch * self.micro_batches_per_generation

    def set_epoch(self, epoch: int) -> None:  # the stream of prompts has its own epochs
        pass

    def __iter__(self) -> Iterator[RolloutBatch | None]:
        per_gen = self.micro_batches_per_generation
        skip = self.start_micro_step() % len(self)  # micro-batches of this epoch already trained (resume)
        for _ in range(skip):
            yield None
        for g in range(skip // per_gen, self.generations_per_epoch):
            first = skip - g * per_gen if g == skip // per_gen else 0
            batch = self.make_batch(self.generations)
            self.generations += 1
            self.last_generation = batch.split(self.steps_per_generation, self.generator)
            for k in range(first, per_gen):
                yield self.last_generation[k % self.steps_per_generation]


class _IterableView(torch.utils.data.IterableDataset):
    """The loader seen as an IterableDataset, which is how accelerate's `skip_first_batches` rebuilds a
    loader it does not know: iterating it iterates the `RolloutLoader` (placeholders included)."""

    def __init__(self, loader: RolloutLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)
