"""Online training under two processes (torchrun, CPU, gloo): lockstep with per-process branches, and
metrics over every process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_grpo.py"


def _run(tmp_path: Path, skip: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           str(SCRIPT), str(tmp_path), skip]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # a deadlock: end the launcher and both workers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the two processes did not finish within 180 s (deadlock?)") from None
    assert proc.returncode == 0, err[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("skip", ["skip", "full"])
def test_two_processes_with_unequal_reward_variance_stay_in_lockstep_and_log_global_metrics(tmp_path, skip):
    rank0, rank1 = _run(tmp_path, skip)  # a deadlock would hit the timeout
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)  # DDP kept the replicas equal
    if skip == "skip":
        assert rank1["skipped"] > 0 and rank0["skipped"] < rank1["skipped"]
    # every process logs the mean over both processes' rewards, not its own
    per_step = 8  # completions per process and step
    for step, (log0, log1) in enumerate(zip(rank0["logs"], rank1["logs"])):
        mine = rank0["seen"][step * per_step:(step + 1) * per_step]
        theirs = rank1["seen"][step * per_step:(step + 1) * per_step]
        assert log0["reward"] == pytest.approx((sum(mine) + sum(theirs)) / (2 * per_step), rel=1e-5)
        assert log0["reward"] == pytest.approx(log1["reward"], rel=1e-6)
        groups = [mine[i:i + 4] for i in range(0, per_step, 4)]
        zero0 = sum(max(g) - min(g) < 1e-6 for g in groups) / len(groups)
        assert log0["frac_reward_zero_std"] == pytest.approx((zero0 + 1.0) / 2)  # process 1's groups are all constant
