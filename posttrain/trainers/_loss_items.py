"""Loss items: what a trainer's loss averages over (tokens, sequences, pairs, steps), counted per optimizer step.

Gradient accumulation must not change the loss. A loss that averages over items (SFT over completion tokens,
DPO over pairs, a process reward model over labelled steps) and is divided by the item count of each
micro-batch weights the items of a small micro-batch more: with rows of different lengths, batch 2 x
accumulation 2 is not batch 4. The fix transformers uses for its own losses is `num_items_in_batch`: the
Trainer gathers every micro-batch of an optimizer step before the first forward, counts the items over all of
them (and all processes), and the loss divides its sum by that count instead.

`LossItemsMixin` does that for posttrain's trainers, whose batches carry masks rather than `labels`:

- a trainer declares `count_loss_items(batch) -> {name: count}` (e.g. `{"tokens": ...}` for SFT, `{"pairs":
  ..., "chosen_tokens": ...}` for DPO with its NLL term);
- `_get_num_items_in_batch` (the Trainer's hook) sums those counts over the step's micro-batches and, with
  `average_tokens_across_devices` (the default) under several processes, over processes; it hands each count
  to `compute_loss` divided by the number of processes, because DDP averages the gradients of the processes;
- `compute_loss` divides its sums by `loss_denominator(num_items_in_batch, name, local_count)`, which is the
  local count where the Trainer passes nothing (evaluation);
- `loss_is_scaled_for_ga = True` tells the Trainer not to divide by the accumulation steps again.

Then the logged loss (the sum over the step's micro-batches) and the gradient are those of one batch holding
every row of the step, whatever the split, the unequal last micro-batch of an epoch included.

Rows with no loss item at all (a conversation without an assistant turn under `assistant_only_loss`, a prompt
that fills `max_length`) would train at loss 0 and still count as rows: `drop_rows_without_loss` removes
them before training, with a warning that gives their number and first indices, and records the count.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch
from transformers import Trainer

logger = logging.getLogger(__name__)

__all__ = ["LossItemsMixin"]

_SHOWN_ROWS = 5


class LossItemsMixin:
    """Normalize losses by the optimizer step's item counts (see the module docstring). Put it before the
    Trainer class in the bases; subclasses implement `count_loss_items`."""

    loss_is_scaled_for_ga = True  # transformers >= 5.19 reads this; see __init__ for earlier versions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            # transformers < 5.19 skips its division by the accumulation steps only for models that "accept loss
            # kwargs" when num_items_in_batch is given; nothing else reads the flag, as compute_loss and
            # _get_num_items_in_batch are ours.
            self.model_accepts_loss_kwargs = True

    def count_loss_items(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The items this trainer's loss averages over in one collated batch, by name."""
        raise NotImplementedError(f"{type(self).__name__} must implement count_loss_items")

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Per-process share of the step's item counts: summed over `batch_samples` (the step's micro-batches)
        and, with `average_tokens_across_devices` under several processes, over processes, then divided by
        the number of processes."""
        if not batch_samples:
            return None
        totals: dict[str, torch.Tensor] = {}
        for batch in batch_samples:
            for name, count in self.count_loss_items(batch).items():
                # Integer counts (exact at any size), on one device whatever the batch tensors were on.
                count = torch.as_tensor(count).to(device=device, dtype=torch.long).reshape(())
                totals[name] = totals[name] + count if name in totals else count
        names = sorted(totals)
        stacked = torch.stack([totals[n] for n in names])
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            per_process = self.accelerator.gather(stacked[None]).sum(0).float() / self.accelerator.num_processes
        else:
            per_process = stacked.float()
        return {n: per_process[i] for i, n in enumerate(names)}

    @staticmethod
    def loss_denominator(num_items_in_batch: Mapping[str, torch.Tensor] | None, name: str,
                         local: torch.Tensor | float) -> torch.Tensor:
        """What a loss sum over `name` items divides by: the step's count when the Trainer passed one (training),
        else this batch's `local` count (evaluation); at least 1, so a batch without items gives 0, not NaN."""
        if isinstance(num_items_in_batch, Mapping) and name in num_items_in_batch:
            value = num_items_in_batch[name]
        else:
            value = torch.as_tensor(local, dtype=torch.float32)
        return torch.as_tensor(value, dtype=torch.float32).clamp(min=1.0)

    # -------------------------------------------------------------------------------------- empty rows
    def drop_rows_without_loss(self, dataset: datasets.Dataset, name: str, keep: Sequence[bool],
                               why: str) -> datasets.Dataset:
        """Remove the rows whose `keep` is False (nothing to train on), warn with their count and first indices
        and record the count as `data/<name>/empty_rows`. `why` says what makes a row empty, for the warning.
        Every row empty is an error: there would be nothing to train or evaluate on."""
        dropped = [i for i, k in enumerate(keep) if not k]
        self._totals[f"data/{name}/empty_rows"] = len(dropped)
        if not dropped:
            return dataset
        if len(dropped) == len(dataset):
            raise ValueError(f"{name}: none of the {len(dataset)} rows has a token to train on ({why})")
        shown = ", ".join(str(i) for i in dropped[:_SHOWN_ROWS]) + (", ..." if len(dropped) > _SHOWN_ROWS else "")
        logger.warning("%s: %d of %d rows have nothing to train on (%s) and were dropped: rows %s",
                       name, len(dropped), len(dataset), why, shown)
        return dataset.select([i for i, k in enumerate(keep) if k])
