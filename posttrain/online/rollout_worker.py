"""A `posttrain serve` subprocess that the trainer starts for itself (asynchronous generation on one machine).

`RolloutWorker.start` writes the policy as it is now (PEFT adapters merged) into a temporary folder, runs
``python -m posttrain.online.server --model <folder> --port 0`` on 127.0.0.1 (HF backend, or vLLM when
asked), reads the URL from its "listening on" line and waits until ``/health`` answers. `stop` ends it
(SIGTERM, then SIGKILL) and removes the folder; on Linux the worker also gets SIGTERM when the trainer
process dies (``PR_SET_DEATHSIG``), so no worker outlives its trainer. Its stdout and stderr go to a log
file whose tail `describe_exit` quotes when the worker died.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from torch import nn

__all__ = ["RolloutWorker", "save_policy_folder"]


def save_policy_folder(model: nn.Module, tokenizer: Any, folder: str) -> None:
    """Write ``model`` (adapters merged, the checkpoint names the server expects) and ``tokenizer`` to ``folder``
    as a Hugging Face model folder: ``config.json``, ``model.safetensors``, the tokenizer files."""
    from safetensors.torch import save_file

    from ..ops.wrappers import unwrap_model
    from .weights import iter_merged_weights

    config = unwrap_model(model).config
    config.save_pretrained(folder)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in iter_merged_weights(model)}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG
    except OSError:
        pass


class RolloutWorker:
    """One `posttrain serve` subprocess on loopback; ``url`` is set once it is healthy.

    ``backend``: "hf" or "vllm"; ``num_threads``: the worker's torch threads (1 by default: on a small CPU
    machine the generator and the trainer get one core each); ``extra_args``: more `posttrain serve` flags.
    """

    def __init__(self, backend: str = "hf", *, num_threads: int | None = 1, seed: int = 0,
                 startup_timeout: float = 300.0, extra_args: list[str] | None = None) -> None:
        if backend not in ("hf", "vllm"):
            raise ValueError(f"backend={backend!r}: expected 'hf' or 'vllm'")
        self.backend, self.num_threads, self.seed = backend, num_threads, seed
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.folder: str | None = None
        self.log_path: str | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "posttrain.online.server", "--model", str(self.folder), "--backend",
               self.backend, "--host", "127.0.0.1", "--port", "0", "--seed", str(self.seed)]
        if self.num_threads and self.backend == "hf":  # vLLM's CPU backend sizes its own thread pool (its
            # attention kernels check that torch's thread count matches the pool they planned for)
            cmd += ["--num-threads", str(self.num_threads)]
        return cmd + self.extra_args

    def start(self, model: nn.Module, tokenizer: Any) -> str:
        """Start the worker serving ``model``'s current weights; return its URL once ``/health`` answers."""
        self.folder = tempfile.mkdtemp(prefix="posttrain-worker-")
        save_policy_folder(model, tokenizer, self.folder)
        log = tempfile.NamedTemporaryFile("w", prefix="posttrain-worker-", suffix=".log", delete=False)
        self.log_path = log.name
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log, text=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        log.close()
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:  # drains stdout (vLLM logs there) into the log, so the worker never blocks on it
            with open(self.log_path, "a") as out:  # type: ignore[arg-type]
                for line in self.proc.stdout:  # type: ignore[union-attr]
                    out.write(line)
                    out.flush()
                    match = re.search(r"listening on (http://\S+)", line)
                    if match and not found:
                        found.append(match.group(1))
                        ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, name="posttrain-worker-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                break
        if not found:
            command = " ".join(self.command)
            reason = self.describe_exit() if self.proc.poll() is not None else \
                f"it did not start within {self.startup_timeout:g} s"
            self.stop()
            raise RuntimeError(f"the rollout worker (`{command}`) failed to start: {reason}")
        self.url = found[0]
        self._wait_healthy(deadline)
        return self.url

    def _wait_healthy(self, deadline: float) -> None:
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as reply:
                    if json.load(reply).get("status") == "ok":
                        return
            except OSError:
                pass
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                reason = self.describe_exit()
                self.stop()
                raise RuntimeError(f"the rollout worker never became healthy: {reason}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def describe_exit(self) -> str:
        """What happened to the worker, for an error message: its exit status and the end of its log."""
        code = None if self.proc is None else self.proc.poll()
        if code is None:
            state = "it is still running"
        elif code < 0:
            state = f"it was killed by signal {-code} ({signal.Signals(-code).name})"
        else:
            state = f"it exited with status {code}"
        tail = self.log_tail().strip()
        return f"{state} (pid {self.pid}, log {self.log_path})" + (f"; the end of its log:\n{tail}" if tail else "")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout``) and delete its model folder. Idempotent;
        the log file is kept only when the worker had died on its own."""
        died = self.proc is not None and self.proc.poll() is not None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if self.log_path and not died and os.path.exists(self.log_path):
            os.unlink(self.log_path)
            self.log_path = None
