"""The rollout server's HTTP layer (in-process, loopback): statuses and reasons, body limits, slow clients,
busy answers, handler failures, and the client's RolloutServerError."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.online.client import RolloutServerClient, RolloutServerError
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engines import SamplingParams
from posttrain.online.server_requests import ServerLimits
from posttrain.online.weights import weights_to_bytes

from _server_helpers import (http_request, raw_request, serve_in_thread, stop_in_thread, trickle_request,
                             wait_for)

TIMEOUT = 1.0
LIMITS = ServerLimits(max_request_mb=1, max_upload_mb=2, max_buffered_mb=3, request_timeout=TIMEOUT, max_n=4,
                      max_new_tokens=32, max_total_tokens=2000)
GOOD = json.dumps({"prompts": [[5, 17, 99]], "params": {"n": 2, "temperature": 0, "max_new_tokens": 6}}).encode()


@pytest.fixture(scope="module")
def server():
    srv = serve_in_thread(LIMITS)
    yield srv
    stop_in_thread(srv)


def _post(server, path, body, **kw):
    return http_request(server.host, server.port, "POST", path, body, **kw)


def _expected_good():
    model, tok = build_tiny("nano")
    rollout = HFEngine(model, tok).generate([[5, 17, 99]], SamplingParams(n=2, temperature=0, max_new_tokens=6))
    return rollout.completion_ids


def test_good_request_over_content_length_and_chunked(server):
    reply = _post(server, "/generate", GOOD)
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json()["completion_ids"] == _expected_good()
    chunked = (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 7 + GOOD[:7] + b"\r\n" +
               b"%x;ext=1\r\n" % (len(GOOD) - 7) + GOOD[7:] + b"\r\n0\r\nTrailer: 1\r\n\r\n")
    reply = raw_request(server.host, server.port, chunked)
    assert reply.status == 200 and reply.json()["completion_ids"] == _expected_good()


@pytest.mark.parametrize("method, path, body, ctype, status, reason", [
    ("GET", "/nope", b"", None, 404, r"no endpoint GET /nope; the endpoints are /health, /info, /generate"),
    ("GET", "/generate", b"", None, 405, r"GET /generate: method not allowed; /generate takes POST"),
    ("DELETE", "/health", b"", None, 405, r"/health takes GET"),
    ("BREW", "/info", b"", None, 405, r"/info takes GET"),
    ("POST", "/generate", b"{}", "text/plain", 415,
     r"Content-Type 'text/plain' is not accepted; send application/json"),
    ("POST", "/update_weights", b"{}", "application/json", 415, r"send application/octet-stream"),
    ("POST", "/generate", b"x" * (2**20 + 1), None, 413,
     r"a body of 1048577 bytes is over the limit of 1048576 bytes \(the server's --max-request-mb\)"),
    ("POST", "/update_weights", b"\0" * (2 * 2**20 + 1), "application/octet-stream", 413, r"--max-upload-mb"),
    ("POST", "/generate", b"", None, 400, r"missing 'prompts'"),
    ("POST", "/generate", b'{"prompts": [[1, 2048]], "params": {"max_new_tokens": 4}}', None, 400,
     r"prompts\[0\]\[1\]=2048: expected a token id"),
    ("POST", "/generate", b'{"prompts": [[1]], "params": {"n": 5}}', "application/json; charset=utf-8", 400,
     r"params\.n=5: expected an integer in \[1, 4\]"),
    ("POST", "/reset", b"[]", None, 400, r"POST /reset: expected an empty body or \{\}"),
])
def test_statuses_and_reasons(server, method, path, body, ctype, status, reason):
    import re
    reply = http_request(server.host, server.port, method, path, body, content_type=ctype)
    assert reply.status == status, reply
    assert re.search(reason, reply.json()["error"]), reply.json()
    if status == 405:
        assert reply.headers["allow"] in ("GET", "POST")


@pytest.mark.parametrize("data, status, reason", [
    (b"\x00\xff garbage\r\n\r\n", 400, r"Bad HTTP/0.9 request type"),
    (b"GET /health HTTP/2.0\r\n\r\n", 400, r"Invalid HTTP version \(2.0\)"),
    (b"GET /health\r\n\r\n", 400, r"HTTP/0.9 requests are not supported"),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, r"request line is longer than 65536 bytes"),
    (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, r"Too many headers"),
    (b"POST /generate HTTP/1.1\r\n\r\n{}", 411, r"a Content-Length header is required"),
    (b"POST /generate HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, r"Content-Length '-5': expected one number"),
    (b"POST /generate HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n{}", 400, r"expected one number"),
    (b"POST /generate HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n{}", 413, r"over the limit"),
    (b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", 400,
     r"the body ended after 2 bytes, short of its Content-Length of 100"),
    (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, r"Transfer-Encoding 'gzip' is not supported"),
    (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", 400,
     r"either Content-Length or Transfer-Encoding"),
    (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, r"chunk size line b'zz\\r\\n'"),
    (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n", 413, r"over the limit of 1048576"),
    (b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX", 400, r"does not end with CRLF"),
])
def test_malformed_http_gets_a_json_4xx(server, data, status, reason):
    import re
    reply = raw_request(server.host, server.port, data)
    assert reply.status == status, reply
    assert re.search(reason, reply.json()["error"]), reply.json()


def test_slow_clients_time_out_without_blocking_others(server):
    """Slowloris: connections that trickle their headers or stall mid-body get 408 after the request
    timeout, while a normal client is served at once meanwhile."""
    replies: list = []

    def trickle(prefix: bytes, partial: bytes) -> None:
        replies.append(trickle_request(server.host, server.port, prefix, partial))

    slow = [(b"", b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 40),
            (b"POST /generate HTTP/1.1\r\nContent-Length: 500\r\n\r\n", b"[" * 40)] * 4
    threads = [threading.Thread(target=trickle, args=p) for p in slow]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.3)
    reply = _post(server, "/generate", GOOD)
    assert reply.status == 200 and time.monotonic() - start < TIMEOUT + 0.3
    for t in threads:
        t.join(timeout=10)
    assert len(replies) == 8 and {r.status for r in replies} == {408}
    assert time.monotonic() - start < TIMEOUT + 3
    reasons = sorted(r.json()["error"][:48] for r in replies)
    assert reasons == ["POST /generate: the body did not arrive in time: "[:48]] * 4 + \
        ["the request did not arrive within the server's --request-timeout 1 s"[:48]] * 4


def test_a_stalled_body_is_dropped_after_the_timeout(server):
    start = time.monotonic()
    reply = raw_request(server.host, server.port, b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
                        half_close=False)
    assert reply.status == 408 and TIMEOUT - 0.1 < time.monotonic() - start < TIMEOUT + 1.5
    assert "the body did not arrive in time: 1 bytes" in reply.json()["error"]


def test_budget_and_connection_limits_answer_503_and_the_client_retries(nano_server_small):
    srv = nano_server_small
    # A slow upload holds 1 MiB of the 1 MiB budget: a second body cannot be buffered meanwhile.
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sock.sendall(b"POST /update_weights HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + b"\0" * 1000)
    assert wait_for(lambda: srv.httpd.budget.used > 0, 5)
    reply = http_request(srv.host, srv.port, "POST", "/generate", GOOD)
    assert reply.status == 503 and "--max-buffered-mb" in reply.json()["error"] and reply.headers["retry-after"] == "1"
    sock.close()
    assert wait_for(lambda: srv.httpd.budget.used == 0, 5)
    _, tok = build_tiny("nano")
    client = RolloutServerClient(srv.url, tok, timeout=10, retries=4)
    # max_connections=2: two idle connections take the slots; a third is answered 503 at once.
    idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(2)]
    assert wait_for(lambda: srv.httpd.active_connections == 2, 5)
    reply = http_request(srv.host, srv.port, "GET", "/health")
    assert reply.status == 503 and "--max-connections" in reply.json()["error"]
    # The client retries a 503 (nothing was done): it succeeds once a slot frees up.
    threading.Timer(0.3, lambda: [s.close() for s in idle]).start()
    assert client._request("GET", "/health") == {"status": "ok"}


@pytest.fixture()
def nano_server_small():
    srv = serve_in_thread(ServerLimits(max_request_mb=1, max_upload_mb=1, max_buffered_mb=1, max_connections=2,
                                       request_timeout=3.0))
    yield srv
    stop_in_thread(srv)


def test_a_failing_handler_answers_500_and_the_server_keeps_serving(server, monkeypatch):
    def boom(prompts, params):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(server.app.engine, "generate", boom)
    reply = _post(server, "/generate", GOOD)
    assert reply.status == 500
    assert reply.json()["error"] == "POST /generate failed on the server: RuntimeError: CUDA out of memory (simulated)"
    monkeypatch.undo()
    assert _post(server, "/generate", GOOD).json()["completion_ids"] == _expected_good()


def test_client_raises_the_servers_reason(server):
    model, tok = build_tiny("nano")
    client = RolloutServerClient(server.url, tok, timeout=10)
    with pytest.raises(RolloutServerError, match=r"\(status 400\): params\.max_new_tokens=33") as err:
        client.generate([[1, 2]], SamplingParams(max_new_tokens=33))
    assert err.value.status == 400 and err.value.reason.startswith("params.max_new_tokens=33: expected an integer")
    # An oversized upload is answered 413 before the server reads it; the client still gets the reason.
    with pytest.raises(RolloutServerError, match=r"status 413.*over the limit of 2097152 bytes") as err:
        client._request("POST", "/update_weights", b"\0" * (8 * 2**20), content_type="application/octet-stream")
    assert err.value.status == 413
    # A sync whose layer chunk is over the server's --max-upload-mb is refused before sending anything.
    big = torch.nn.Module()
    big.register_parameter("model.embed_tokens.weight".replace(".", "_"), torch.nn.Parameter(torch.zeros(2**20)))
    version = client._request("GET", "/info")["weights_version"]
    with pytest.raises(RolloutServerError, match=r"a weight chunk of 4.0 MiB .* is over the rollout server's "
                                                 r"--max-upload-mb 2"):
        client.sync_weights(big, force=True)
    assert client._request("GET", "/info")["weights_version"] == version
    info = client._request("GET", "/info")
    assert info["limits"]["max_n"] == 4 and info["limits"]["vocab_size"] == 2048
    assert info["limits"]["context_length"] == 2048


def test_weight_update_over_http_all_or_nothing(server):
    model, tok = build_tiny("nano")
    client = RolloutServerClient(server.url, tok, timeout=10)
    up = "model.layers.0.mlp.up_proj.weight"
    blob = weights_to_bytes([(up, torch.ones_like(model.get_parameter(up))),
                             ("model.norm.weight", torch.zeros(5))])
    with pytest.raises(RolloutServerError, match=r"status 400.*'model.norm.weight': shape \(5,\) does not match"):
        client._request("POST", "/update_weights", blob, content_type="application/octet-stream")
    assert _post(server, "/generate", GOOD).json()["completion_ids"] == _expected_good()
