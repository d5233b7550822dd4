"""Shared pieces of the Online DPO / XPO / Nash-MD tests."""

from __future__ import annotations

import torch

from posttrain.online.logprobs import completion_mask
from posttrain.online.rollout_batch import RolloutBatch
from posttrain.tasks import ArithmeticTask


def short_config(config_cls, **kw):
    """A few-step config on a tiny model: 8 completions per micro-batch, 6 new tokens, lr 1e-2, no saving."""
    base = dict(output_dir="/tmp/posttrain-test-online-pref", per_device_train_batch_size=8, max_new_tokens=6,
                max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-2, log_completions=False,
                save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    base.update(kw)
    return config_cls(**base)


def prompts(n: int = 32):
    return ArithmeticTask(digits=2).prompt_only(n)


def paired_batch(logps_rows, ref_rows, group_ids, **tensors):
    """A `RolloutBatch` of ``len(logps_rows)`` completions of equal width with the given groups and tensors."""
    logps, ref = torch.tensor(logps_rows), torch.tensor(ref_rows)
    n, width = logps.shape
    mask = completion_mask([width] * n).float()
    batch = RolloutBatch([[1]] * n, [[2] * width] * n, mask, torch.zeros(n), group_ids=torch.tensor(group_ids),
                         ref_logps=ref, **{k: torch.tensor(v) for k, v in tensors.items()})
    return batch, logps, mask
