"""`posttrain <method> --num_processes 2` runs the method under `accelerate launch` (CPU, gloo): for SFT and DPO
the two processes, each with half the batch, follow the same loss trajectory as one process with the whole
batch. GRPO runs in two processes with its groups whole; its trajectory is not compared with one process's,
since each process samples with a seed of its own (so the processes draw different completions), which makes
the completions, and so the losses, differ from a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.launch import accelerate_command, split_launch_flags

ROOT = Path(__file__).parents[1]
_COMMON = ("model_name_or_path: tiny:nano\ndataset_test_split: null\ntask_train_size: 32\nmax_steps: 4\n"
           "logging_steps: 1\nlearning_rate: 1.0e-3\nreport_to: none\nsave_strategy: 'no'\nseed: 0\n"
           "lr_scheduler_type: constant\ndisable_tqdm: true\n")


def test_launch_flags_come_off_the_command_line_and_become_accelerate_launch():
    num, config, rest = split_launch_flags(["--config", "a.yaml", "--num_processes=2", "--main_process_port", "1234",
                                            "--max_steps", "3"])
    assert (num, config, rest) == (2, None, ["--config", "a.yaml", "--max_steps", "3"])
    cmd = accelerate_command("sft", rest, num, None, 1234)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-7:] == ["-m", "posttrain.cli", "sft", *rest]
    with_file = accelerate_command("dpo", [], None, "fsdp.yaml")
    assert with_file[3:5] == ["--config_file", "fsdp.yaml"] and "--multi_gpu" not in with_file
    with pytest.raises(SystemExit, match="positive integer"):
        split_launch_flags(["--num_processes", "two"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp_path: Path, method: str, extra: str, processes: int, batch: int, launcher: tuple = ()) -> list[dict]:
    out = tmp_path / f"{method}-{processes}{'-'.join(launcher[-1:]).replace('/', '_')}"
    config = tmp_path / f"{method}.yaml"
    config.write_text(_COMMON + extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "posttrain.cli", method, "--config", str(config), "--output_dir", str(out),
           "--per_device_train_batch_size", str(batch)]
    if processes > 1:
        cmd += [*(launcher or ("--num_processes", str(processes))), "--main_process_port", str(_free_port())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("sft", "max_length: 64\n"), ("dpo", "max_length: 96\n")])
def test_two_processes_follow_the_one_process_loss_trajectory(tmp_path, method, extra):
    one = [h["loss"] for h in _run(tmp_path, method, extra, 1, 4) if "loss" in h]
    two = [h["loss"] for h in _run(tmp_path, method, extra, 2, 2) if "loss" in h]
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)
    assert one[0] != pytest.approx(one[-1], rel=1e-3)  # the runs trained: the trajectory is not flat


@pytest.mark.slow
def test_grpo_runs_in_two_processes_with_the_global_batch_and_whole_groups(tmp_path):
    extra = ("num_generations: 4\nmax_completion_length: 8\nreward_funcs: ['_online_helpers:text_length']\n"
             "log_completions: false\n")
    logs = [h for h in _run(tmp_path, "grpo", extra, 2, 8) if "reward" in h]
    assert len(logs) == 4
    # 2 processes x 8 completions = 16 a step = 4 whole groups of 4: 4 of the 32 prompts, an eighth of an epoch
    assert [h["epoch"] for h in logs] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert all(h["frac_reward_zero_std"] < 1.0 for h in logs) and any(h["grad_norm"] > 0 for h in logs)


@pytest.mark.slow
def test_fsdp2_from_an_accelerate_config_follows_the_one_process_sft_trajectory(tmp_path):
    config = ("--accelerate_config", str(ROOT / "examples" / "accelerate" / "fsdp2.yaml"))
    one = [h["loss"] for h in _run(tmp_path, "sft", "max_length: 64\n", 1, 4) if "loss" in h]
    two = [h["loss"] for h in _run(tmp_path, "sft", "max_length: 64\n", 2, 2, config) if "loss" in h]
    assert len(two) == 4 and two == pytest.approx(one, rel=1e-4, abs=1e-6)
