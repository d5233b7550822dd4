"""Suite-wide settings. Under pytest-xdist (`scripts/test.sh` runs `-n 2`), each worker gets an equal share of
the CPU cores as torch threads: two workers with every core each would oversubscribe the machine, and OpenMP's
barriers wait on descheduled threads (several times slower, measured on 2 cores)."""

from __future__ import annotations

import os

import torch


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
