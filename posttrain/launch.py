"""`posttrain <method> --num_processes N` / `--accelerate_config FILE`: relaunch the same command under
`accelerate launch`, so that a user gets data-parallel training (DDP; FSDP or DeepSpeed from an accelerate
config file) without writing the launcher line.

The two flags are taken off the command line and the rest goes unchanged to `python -m posttrain.cli <method>`
in every process. Without a config file, `--num_processes N` (N > 1) asks accelerate for its multi-process
launcher (`--multi_gpu`, which is torchrun underneath): on a machine without GPUs every process runs on the CPU
and the processes talk over gloo. With a config file, the file decides (its `num_processes` unless the flag
is given too).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

__all__ = ["accelerate_command", "launch_main", "split_launch_flags"]

_FLAGS = ("--num_processes", "--accelerate_config", "--main_process_port")


def _split(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    values: dict[str, str] = {}
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in _FLAGS:
            if not eq:
                if i + 1 >= len(args):
                    raise SystemExit(f"error: {name} needs a value")
                value, i = args[i + 1], i + 1
            values[name] = value
        else:
            rest.append(args[i])
        i += 1
    return values, rest


def split_launch_flags(argv: Sequence[str]) -> tuple[int | None, str | None, list[str]]:
    """(num_processes, accelerate config file, the other arguments) of a method's command line; both
    `--flag value` and `--flag=value` forms. `--main_process_port` is a launcher flag too (left out of the rest)."""
    values, rest = _split(argv)
    num = values.get("--num_processes")
    if num is not None and (not num.isdigit() or int(num) < 1):
        raise SystemExit(f"error: --num_processes must be a positive integer, got {num!r}")
    return (int(num) if num is not None else None), values.get("--accelerate_config"), rest


def accelerate_command(method: str, argv: Sequence[str], num_processes: int | None, config_file: str | None,
                       main_process_port: int | None = None) -> list[str]:
    """The `accelerate launch` command line that runs `posttrain <method> argv` in `num_processes` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    elif (num_processes or 1) > 1:
        cmd += ["--multi_gpu"]  # accelerate's multi-process launcher, on GPUs or (gloo) on CPUs
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if not config_file:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", "posttrain.cli", method, *argv]


def launch_main(method: str, argv: Sequence[str]) -> int | None:
    """Relaunch `posttrain <method>` under accelerate when `--num_processes` (> 1) or `--accelerate_config` is
    on the command line, returning the launcher's exit status; None when neither is (run in this process)."""
    num, config_file, rest = split_launch_flags(argv)
    if config_file is None and (num is None or num == 1):
        return None
    port = _split(argv)[0].get("--main_process_port")
    return subprocess.call(accelerate_command(method, rest, num, config_file, int(port) if port else None))
