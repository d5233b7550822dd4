"""Start and stop `posttrain serve` subprocesses for the rollout-server tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.unlink(self.log_path)


def start_server(*args: str, timeout: float = 240.0, cli: bool = False) -> ServerProcess:
    """Run the server on a free port (`--port 0`) and wait for its "listening on URL" line."""
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    entry = ["-m", "posttrain.cli", "serve"] if cli else ["-m", "posttrain.online.server"]
    proc = subprocess.Popen([sys.executable, *entry, "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=log, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:  # keeps draining stdout (vLLM logs there) so the server never blocks on the pipe
        with open(log.name, "a") as out:
            for line in proc.stdout:  # type: ignore[union-attr]
                out.write(line)
                match = re.search(r"listening on (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))
                    ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout)
    server = ServerProcess(proc, found[0] if found else "", log.name)
    if not found:
        text = server.log()
        server.stop()
        pytest.fail(f"rollout server did not start within {timeout} s; its log:\n{text[-4000:]}")
    return server


def wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False
