"""The rollout server's HTTP layer: a threaded stdlib server that no request can crash, wedge or fill up.

- One thread per connection (at most ``max_connections``; more are answered 503 at once), HTTP/1.0, one
  request per connection. Generation itself is serialized by the app's lock, so ``/health`` and ``/info``
  answer while a long generation runs.
- Deadlines: the request line, headers and body must arrive within ``request_timeout`` plus 1 s per MiB
  of announced body, and a socket silent for ``request_timeout`` is dropped, so a slow or
  stuck client (slowloris) holds one thread for a bounded time and never blocks the others. The answer is
  sent under the same timeout, so a client that never reads does not hold a thread either.
- Bodies: ``Content-Length`` is checked against the endpoint's limit before a byte is read, then the body
  is read in 1 MiB pieces as they arrive (a lying length costs only what was sent); a chunked body is
  decoded under the same limit. All bodies being received together stay within ``max_buffered_bytes``
  (else 503), and at most two JSON bodies are parsed at once, so memory stays bounded.
- Every answer is JSON; an error is ``{"error": reason}`` with a 4xx for the client's mistakes (400 bad
  field, 404 unknown path, 405 wrong method, 408 too slow, 411 no length, 413 too large, 415 wrong
  Content-Type), 500 when a handler fails (logged; the server keeps serving), 503 when busy. After an
  early answer the rest of the body is drained for a moment, so the client reads the reason rather than a
  reset connection.
"""

from __future__ import annotations

import io
import json
import logging
import re
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping

from .server_requests import RequestError, ServerLimits, parse_json

__all__ = ["Endpoint", "RolloutHTTPServer"]

logger = logging.getLogger("posttrain.serve")

_PIECE = 2**20  # bytes read (and reserved from the budget) at a time
_UPLOAD_RATE = 2**20  # bytes/s a long body must average after the first request_timeout seconds
_LINGER_S = 2.0  # how long the rest of an unread body is drained after an early answer
_LINGER_BYTES = 64 * 2**20
_PARSE_SLOTS = 2
_MEDIA = {"json": "application/json", "binary": "application/octet-stream"}


@dataclass
class Endpoint:
    """One method on one path: ``body`` is "none", "json" (parsed, handler gets the value) or "binary"
    (handler gets the bytes); ``limit`` is its body limit in bytes (0 for "none")."""

    body: str
    handler: Callable[[Any], dict[str, Any]]
    limit: int = 0
    limit_flag: str = ""


class _ByteBudget:
    """Bytes of request bodies held at once, across all connections."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.capacity:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _DeadlineIO(io.RawIOBase):
    """Socket reads that fail with TimeoutError once ``deadline`` passes or after ``idle`` s without data."""

    def __init__(self, sock: socket.socket, idle: float) -> None:
        self.sock = sock
        self.idle = idle
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(min(left, self.idle))
        try:
            return self.sock.recv_into(buffer)
        except socket.timeout:
            raise TimeoutError("no data from the client in time") from None


class _Handler(BaseHTTPRequestHandler):
    server: "RolloutHTTPServer"
    server_version = "posttrain-serve"
    protocol_version = "HTTP/1.0"

    # ---- connection ------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a reader that honours the request deadline
        self._io = _DeadlineIO(self.connection, self.server.limits.request_timeout)
        self.rfile = io.BufferedReader(self._io, 65536)

    def handle(self) -> None:
        self.handle_one_request()  # HTTP/1.0: one request per connection

    def handle_one_request(self) -> None:
        limits = self.server.limits
        self._started = time.monotonic()
        self._io.deadline = self._started + limits.request_timeout
        self._unread = False  # the client may still be sending body bytes we did not read
        self._reserved = 0
        self._replied = False
        self.close_connection = True
        self.command, self.request_version, self.requestline = "", "HTTP/1.0", ""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                return
            if len(self.raw_requestline) > 65536:
                self._unread = True
                self.send_error(414, "the request line is longer than 65536 bytes")
                return
            if not self.parse_request():  # it has answered (as JSON, see send_error)
                self._unread = True
                return
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
                self._error(400, "HTTP/0.9 requests are not supported: send HTTP/1.0 or HTTP/1.1")
                return
            self._serve()
        except TimeoutError:
            self._unread = True
            self._error(408, f"the request did not arrive within the server's --request-timeout "
                             f"{limits.request_timeout:g} s")
        except OSError as err:  # the client went away; nothing to answer
            logger.debug("connection from %s ended: %s", self.address_string(), err)
        finally:
            self.server.budget.give(self._reserved)
            self._reserved = 0
            if self._replied and (self._unread or self._pending()):
                self._linger()

    def _pending(self) -> bool:
        """Whether the client sent more than we read (e.g. past its Content-Length): closing now would reset."""
        try:
            return bool(select.select([self.connection], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _linger(self) -> None:
        """Half-close, then drain what the client still sends for a moment: closing with unread data would
        reset the connection and the client could lose the answer it is about to read."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            end, drained = time.monotonic() + _LINGER_S, 0
            while drained < _LINGER_BYTES and (left := end - time.monotonic()) > 0:
                self.connection.settimeout(left)
                data = self.connection.recv(65536)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    # ---- answers ---------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        if self.request_version == "HTTP/0.9":  # the stdlib's default before it parsed a version: always a status line
            self.request_version = "HTTP/1.0"
        self.connection.settimeout(self.server.limits.request_timeout)  # a client that never reads its answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self._replied = True
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        try:
            self._reply(status, {"error": message}, headers)
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own rejections (malformed request line, headers too long, ...) as JSON 4xx."""
        if code == 505:  # a version we do not speak is the client's mistake
            code = 400
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("bad request",))[0])

    # ---- routing ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        path = self.path.split("?", 1)[0]
        where = f"{self.command} {path}"[:200]
        endpoints = self.server.routes.get(path)
        if endpoints is None:
            self._unread = True
            self._error(404, f"no endpoint {where}; the endpoints are {', '.join(self.server.routes)} "
                             "(see `posttrain serve --help`)")
            return
        endpoint = endpoints.get(self.command)
        if endpoint is None:
            self._unread = True
            allowed = ", ".join(endpoints)
            self._error(405, f"{where}: method not allowed; {path} takes {allowed}", {"Allow": allowed})
            return
        try:
            result = endpoint.handler(self._read(endpoint, where))
        except RequestError as err:
            self._error(err.status, str(err), {"Retry-After": "1"} if err.status == 503 else None)
        except Exception as err:  # report, keep serving
            logger.error("%s failed:\n%s", where, traceback.format_exc())
            self._error(500, f"{where} failed on the server: {type(err).__name__}: {str(err)[:500]}")
        else:
            self._reply(200, result)

    def _read(self, endpoint: Endpoint, where: str) -> Any:
        if endpoint.body == "none":
            if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
                self._unread = True  # a body we ignore
            return None
        media = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if media and media != _MEDIA[endpoint.body]:
            self._unread = True
            raise RequestError(f"{where}: Content-Type {media[:100]!r} is not accepted; send "
                               f"{_MEDIA[endpoint.body]}", 415)
        body = self._body(endpoint, where)
        if endpoint.body == "binary":
            return bytes(body)  # what safetensors reads; the bytearray is freed on return (memory: one copy)
        with self.server.parse_slots:
            return parse_json(body, where)

    # ---- bodies ----------------------------------------------------------------------------------
    def _body(self, endpoint: Endpoint, where: str) -> bytearray:
        lengths = self.headers.get_all("Content-Length") or []
        codings = self.headers.get_all("Transfer-Encoding") or []
        self._unread = True
        if codings:
            if lengths:
                raise RequestError(f"{where}: send either Content-Length or Transfer-Encoding, not both")
            if [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
                raise RequestError(f"{where}: Transfer-Encoding {', '.join(codings)[:100]!r} is not supported; "
                                   "send Content-Length or Transfer-Encoding: chunked")
            return self._chunked(endpoint, where)
        if not lengths:
            raise RequestError(f"{where}: a Content-Length header is required (or Transfer-Encoding: chunked)", 411)
        text = lengths[0].strip()
        if len({v.strip() for v in lengths}) > 1 or not re.fullmatch(r"[0-9]{1,19}", text):
            raise RequestError(f"{where}: Content-Length {', '.join(lengths)[:60]!r}: expected one number of bytes")
        size = int(text)
        self._check_size(size, endpoint, where)
        body = bytearray()
        self._read_into(body, size, where, f"its Content-Length of {size}")
        self._unread = False
        return body

    def _check_size(self, size: int, endpoint: Endpoint, where: str) -> None:
        if size > endpoint.limit:
            raise RequestError(f"{where}: a body of {size} bytes is over the limit of {endpoint.limit} bytes "
                               f"(the server's {endpoint.limit_flag})", 413)
        self._io.deadline = max(self._io.deadline,
                                self._started + self.server.limits.request_timeout + size / _UPLOAD_RATE)

    def _read_into(self, body: bytearray, size: int, where: str, announced: str) -> None:
        """Append exactly ``size`` bytes to ``body`` as they arrive, each piece reserved from the shared budget."""
        end = len(body) + size
        while len(body) < end:
            want = min(_PIECE, end - len(body))
            if not self.server.budget.take(want):
                raise RequestError(f"{where}: the server is receiving too many bodies at once (its "
                                   "--max-buffered-mb); retry shortly", 503)
            try:
                piece = self.rfile.read1(want)
            except TimeoutError:
                self.server.budget.give(want)
                raise RequestError(f"{where}: the body did not arrive in time: {len(body)} bytes in "
                                   f"{time.monotonic() - self._started:.1f} s of {announced} (the server's "
                                   "--request-timeout)", 408) from None
            self.server.budget.give(want - len(piece))
            self._reserved += len(piece)
            if not piece:
                raise RequestError(f"{where}: the body ended after {len(body)} bytes, short of {announced}")
            body += piece

    def _chunked(self, endpoint: Endpoint, where: str) -> bytearray:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_text):
                raise RequestError(f"{where}: malformed chunked body: chunk size line {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                break
            self._check_size(len(body) + size, endpoint, where)
            self._read_into(body, size, where, f"a chunk of {size}")
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise RequestError(f"{where}: malformed chunked body: a chunk does not end with CRLF")
        for _ in range(64):  # trailers, up to the blank line
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n"):
                self._unread = False
                return body
            if not line.endswith(b"\n"):
                break
        raise RequestError(f"{where}: malformed chunked body: no blank line after the last chunk")


_BUSY = json.dumps({"error": "the server is at its --max-connections; retry shortly"}).encode()
_BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Content-Length: " + str(len(_BUSY)).encode() + b"\r\nConnection: close\r\n\r\n" + _BUSY)


class RolloutHTTPServer(ThreadingHTTPServer):
    """Serves ``routes`` (path -> method -> :class:`Endpoint`) under ``limits``; see the module docstring."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], routes: Mapping[str, Mapping[str, Endpoint]],
                 limits: ServerLimits) -> None:
        self.routes = routes
        self.limits = limits
        self.budget = _ByteBudget(limits.max_buffered_bytes)
        self.parse_slots = threading.BoundedSemaphore(_PARSE_SLOTS)
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def active_connections(self) -> int:
        return self._active

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            busy = self._active >= self.limits.max_connections
            if not busy:
                self._active += 1
        if busy:
            try:
                request.settimeout(0.5)
                request.sendall(_BUSY_REPLY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.warning("connection from %s failed:\n%s", client_address, traceback.format_exc())
