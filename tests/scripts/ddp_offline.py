"""Run by tests/test_grad_accumulation.py under `torchrun --nproc_per_node 2` (CPU, gloo): one optimizer step of
an offline trainer over the 4 rows of `test_grad_accumulation.four_rows`, batch 1 x accumulation 2 on each of
the two processes; process 0 writes the logged loss, the grad norm and the parameter update to `<out>/result.pt`.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_offline.py OUT METHOD
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_grad_accumulation import METHODS, one_step  # noqa: E402


def main(out: str, method: str) -> None:
    torch.set_num_threads(1)
    trainer_cls, config_cls, rows, config = METHODS[method]
    loss, norm, update = one_step(out, trainer_cls, config_cls, rows, 1, 2, use_cpu=True, ddp_timeout=60, **config)
    if int(os.environ["RANK"]) == 0:
        torch.save({"loss": loss, "grad_norm": norm, "update": update}, os.path.join(out, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
