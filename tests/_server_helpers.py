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


# ---- in-process server (a thread) and raw HTTP, for the HTTP-layer and fuzz tests -----------------

@dataclass
class InProcessServer:
    httpd: object
    app: object
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def serve_in_thread(limits=None, *, model=None, tokenizer=None):
    """A `RolloutServer` on tiny:nano (HF backend) served by a thread on 127.0.0.1, a free port.
    Stop it with `stop_in_thread`."""
    from posttrain.models import build_tiny
    from posttrain.online.engine_hf import HFEngine
    from posttrain.online.server import RolloutServer, make_http_server

    if model is None:
        model, tokenizer = build_tiny("nano")
    app = RolloutServer(HFEngine(model, tokenizer), backend="hf", model="tiny:nano", limits=limits)
    httpd = make_http_server(app, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return InProcessServer(httpd, app, "127.0.0.1", httpd.server_address[1])


def stop_in_thread(server: InProcessServer) -> None:
    server.httpd.shutdown()
    server.httpd.server_close()


@dataclass
class RawReply:
    status: int | None  # None: no HTTP status line came back (connection dropped or not HTTP)
    headers: dict
    body: bytes
    error: str = ""  # the socket error, if any

    def json(self):
        import json
        return json.loads(self.body)


def raw_request(host: str, port: int, data: bytes, *, half_close: bool = True, timeout: float = 10.0,
                pause_after: float = 0.0) -> RawReply:
    """Send raw bytes on a fresh loopback connection and read the whole reply (HTTP/1.0: until close).
    `half_close` shuts the write side after sending (the server sees the end of the body)."""
    import socket

    assert host in ("127.0.0.1", "localhost", "::1"), "tests talk to loopback only"
    sock = socket.create_connection((host, port), timeout=timeout)
    chunks: list[bytes] = []
    error = ""
    try:
        try:
            sock.sendall(data)
            if pause_after:
                time.sleep(pause_after)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as err:  # the server may answer and close before reading everything
            error = f"send: {type(err).__name__}"
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            chunks.append(piece)
    except OSError as err:
        error = error or f"recv: {type(err).__name__}: {err}"
    finally:
        sock.close()
    return parse_reply(b"".join(chunks), error)


def trickle_request(host: str, port: int, prefix: bytes, trickle: bytes, *, interval: float = 0.1,
                    seconds: float = 10.0) -> RawReply:
    """A slow client: send `prefix` at once, then `trickle` one byte every `interval` seconds (each send
    succeeds, the request as a whole is late) until the server answers or `seconds` pass; read the reply."""
    import select
    import socket

    sock = socket.create_connection((host, port), timeout=seconds + 5)
    data = b""
    try:
        sock.sendall(prefix)
        end = time.monotonic() + seconds
        for byte in trickle:
            if time.monotonic() > end or select.select([sock], [], [], interval)[0]:
                break  # the server answered (or we gave up): stop sending, read it
            sock.sendall(bytes([byte]))
        while piece := sock.recv(65536):
            data += piece
    except OSError:
        pass
    finally:
        sock.close()
    return parse_reply(data)


def parse_reply(data: bytes, error: str = "") -> RawReply:
    head, sep, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    if not sep or not match:
        return RawReply(None, {}, data, error or "no HTTP reply")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        headers[key.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return RawReply(int(match.group(1)), headers, body, error)


def http_request(host: str, port: int, method: str, path: str, body: bytes = b"", *,
                 content_type: str | None = "application/json", headers: dict | None = None, **kw) -> RawReply:
    """A well-formed HTTP/1.1 request with a correct Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw_request(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body, **kw)
