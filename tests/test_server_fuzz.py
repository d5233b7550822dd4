"""Fuzzing the rollout server: seeded random and adversarial requests, on loopback only, bounded in count
and time, from several concurrent clients. After every batch the server must still answer /health and a
valid /generate with exactly the right completions, its memory must stay bounded, and every request must
have been answered: a 4xx with a JSON reason for every bad one, never a 5xx, never a dropped connection
(except for garbage sent at the socket level, where closing is allowed).

The quick version (in-process server, ~50 requests) is in the default suite; the full one (a
`posttrain serve` subprocess, 400 requests, slowloris clients) is marked slow."""

from __future__ import annotations

import json
import os
import random
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engines import SamplingParams
from posttrain.online.server_requests import ServerLimits
from posttrain.online.weights import weights_to_bytes

from _server_helpers import (RawReply, http_request, raw_request, serve_in_thread, start_server,
                             trickle_request,
                             stop_in_thread)

HOST = "127.0.0.1"  # loopback only, always
VOCAB = 2048
LIMITS = dict(max_request_mb=1, max_upload_mb=2, max_buffered_mb=16, max_n=4, max_new_tokens=16,
              max_total_tokens=512, request_timeout=2.0, max_connections=48)
CANONICAL = {"prompts": [[5, 17, 99], [3, 4]], "params": {"n": 2, "temperature": 0, "max_new_tokens": 8}}
RSS_GROWTH_MB = 200  # bodies are at most ~2 MiB here; a leak or an unbounded buffer would show far above


@dataclass
class Case:
    kind: str
    data: bytes  # the raw bytes sent
    expect: str  # "4xx", "ok_or_4xx", "ok" (the canonical request), or "socket" (4xx or a closed connection)
    half_close: bool = True


# ---- the request generator (seeded) ---------------------------------------------------------------

def _http(method: str, path: str, body: bytes = b"", ctype: str | None = "application/json",
          extra: str = "", length: int | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    return (head + extra + "\r\n").encode() + body


def _bad_value(rng: random.Random):
    return rng.choice([-1, -(2**70), 2**64, 10**40, 1.5, -0.0, 1e308, "7", "", None, True, False, [], {}, [1], {"a": 1},
                       VOCAB, VOCAB + rng.randrange(1, 10**6)])


def _mutated_generate(rng: random.Random) -> dict:
    request = json.loads(json.dumps(CANONICAL))
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(9)
        if where not in (0, 1, 7) and not isinstance(request.get("params"), dict):
            continue  # an earlier mutation replaced the params
        if where == 0:  # a token id
            prompt = rng.choice(request["prompts"]) if isinstance(request.get("prompts"), list) and request["prompts"] \
                and isinstance(request["prompts"][0], list) else None
            if prompt:
                prompt[rng.randrange(len(prompt))] = _bad_value(rng)
        elif where == 1:  # the prompts themselves
            request["prompts"] = rng.choice([[], None, "text", 5, [[]], [None], [[1]] * 5000, [[1] * 3000], [{}],
                                             [[{"role": "user"}]], [[{"role": 1, "content": "x"}]],
                                             [[{"role": "user", "content": {"nested": [1]}}]], ["\ud800"],
                                             ["hello there"], ["\u00e9\u4e2d\U0001f600"],
                                             [[{"role": "user", "content": "2+3?"}]]])
        elif where == 2:
            request["params"]["n"] = rng.choice([0, -1, 5, 1000, 10**30, 2.0, "2", None, True, 1, 3])
        elif where == 3:
            request["params"]["max_new_tokens"] = rng.choice([0, -5, 17, 10**9, 2**63, 1.0, "8", None, 1, 16])
        elif where == 4:
            request["params"][rng.choice(["temperature", "top_p", "min_p", "repetition_penalty"])] = rng.choice(
                [-1, 0, 1e-30, 0.5, 1, 1.0001, 2, 1e308, 10**400, "hot", None, [0.5]])
        elif where == 5:
            request["params"][rng.choice(["top_k", "seed"])] = rng.choice(
                [-2, -1, 0, 5, 2**63, 2**64, 1.5, "s", None, True])
        elif where == 6:
            request["params"]["stop_token_ids"] = rng.choice([[VOCAB], [-1], [1.5], "0", [0] * 1000, None, [0, 2]])
        elif where == 7:
            request[rng.choice(["params", "extra", "prompts"])] = _bad_value(rng)
        else:
            request["params"][rng.choice(["temprature", "best_of", "n "])] = 1
    return request


def _bad_weights(rng: random.Random) -> bytes:
    choice = rng.randrange(8)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 4096))
    if choice == 1:
        return weights_to_bytes([("model.nope.weight", torch.zeros(3))])
    if choice == 2:
        return weights_to_bytes([("model.norm.weight", torch.zeros(rng.choice([1, 63, 65, 128])))])
    if choice == 3:
        return weights_to_bytes([("model.norm.weight", torch.zeros(64, dtype=torch.int64))])
    if choice == 4:
        return weights_to_bytes([("model.layers.0.mlp.up_proj.weight", torch.ones(176, 64)),
                                 ("model.norm.weight", torch.full((64,), float(rng.choice(["nan", "inf"]))))])
    if choice == 5:  # a header that promises a huge tensor
        header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}})
        return struct.pack("<Q", len(header)) + header.encode()
    if choice == 6:  # a valid blob, truncated
        blob = weights_to_bytes([("model.norm.weight", torch.ones(64))])
        return blob[:rng.randrange(1, len(blob) - 1)]
    return struct.pack("<Q", 2**63) + b"{}"


def _garbage_json(rng: random.Random) -> bytes:
    valid = json.dumps(CANONICAL).encode()
    return rng.choice([
        rng.randbytes(rng.randrange(1, 2000)),
        valid[:rng.randrange(1, len(valid) - 1)],
        b"[" * rng.choice([1000, 100_000]) + b"]" * rng.choice([0, 10]),
        b'{"prompts": ' * 50_000,
        b"9" * rng.choice([4301, 100_000]),
        b'{"prompts": [[1]], "params": {"temperature": NaN}}',
        b'{"prompts": [[1e999]]}',
        b'"just a string"', b"null", b"[]", b"{}", b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00",
    ])


def _http_level(rng: random.Random) -> Case:
    valid = json.dumps(CANONICAL).encode()
    choice = rng.randrange(16)
    if choice == 0:
        return Case("method", _http(rng.choice(["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "XYZ"]),
                                    "/generate", valid), "4xx")
    if choice == 1:
        return Case("path", _http("GET", rng.choice(["/", "/nope", "/health/../info", "//generate", "/generate2",
                                                    "/" + "a" * 5000]), b""), "4xx")
    if choice == 2:
        return Case("ctype", _http("POST", "/generate", valid, rng.choice(["text/plain", "application/xml",
                                                                           "multipart/form-data", "application/"
                                                                           "x-www-form-urlencoded"])), "4xx")
    if choice == 3:  # no Content-Length at all
        return Case("no-length", f"POST /generate HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() + valid, "4xx")
    if choice == 4:  # announced far over the limit, little sent
        return Case("oversized", _http("POST", rng.choice(["/generate", "/update_weights"]), valid[:10],
                                       length=rng.choice([2**21, 2**31, 10**18])), "4xx")
    if choice == 5:  # a lying Content-Length: fewer bytes than announced, then the write side closes
        return Case("short-body", _http("POST", "/generate", valid[:20], length=len(valid)), "4xx")
    if choice == 6:  # a lying Content-Length: more bytes than announced (the rest is ignored)
        return Case("long-body", _http("POST", "/generate", valid + b"garbage" * 100, length=len(valid)), "ok_or_4xx")
    if choice == 7:
        return Case("bad-length", _http("POST", "/generate", valid, extra="", length=None).replace(
            b"Content-Length: %d" % len(valid), rng.choice([b"Content-Length: -1", b"Content-Length: 1e3",
                                                            b"Content-Length: ", b"Content-Length: 0x10",
                                                            b"Content-Length: 9" * 2])), "4xx")
    if choice == 8:
        return Case("empty", _http("POST", rng.choice(["/generate", "/update_weights"]), b"",
                                   ctype=rng.choice(["application/json", "application/octet-stream", None])), "4xx")
    if choice == 9:  # chunked: valid, or malformed
        body = valid if rng.random() < 0.5 else _garbage_json(rng)[:5000]
        cut = rng.randrange(1, len(body))
        chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (cut, body[:cut], len(body) - cut, body[cut:])
        if rng.random() < 0.5:
            chunks = rng.choice([b"zz\r\n", b"ffffffffffffffffff\r\n", chunks[:-4], b"5\r\n{}\r\n0\r\n\r\n",
                                 b"fffff\r\n" + b"x" * 100])
        return Case("chunked", f"POST /generate HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .encode() + chunks, "ok_or_4xx")
    if choice == 10:
        return Case("many-headers", f"GET /health HTTP/1.1\r\n".encode() + b"X-A: b\r\n" * rng.choice([101, 500])
                    + b"\r\n", "4xx")
    if choice == 11:
        return Case("long-header", b"GET /health HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", "4xx")
    if choice == 12:
        return Case("version", rng.choice([b"GET /health HTTP/2.0\r\n\r\n", b"GET /health HTTP/9.9\r\n\r\n",
                                           b"GET /health HTTP/1.x\r\n\r\n", b"GET /health\r\n\r\n",
                                           b"GET /health FOO/1.1\r\n\r\n"]), "socket")
    if choice == 13:
        return Case("te+cl", _http("POST", "/generate", valid, extra="Transfer-Encoding: chunked\r\n"), "4xx")
    if choice == 14:
        return Case("reset-body", _http("POST", "/reset", rng.choice([b"[]", b'{"a": 1}', b"nope", b"{" * 1000])),
                    "4xx")
    return Case("upload-too-big", _http("POST", "/update_weights", b"\0" * (2 * 2**20 + 1),
                                        "application/octet-stream"), "4xx")


def make_cases(rng: random.Random, count: int) -> list[Case]:
    """``count`` requests: random bytes, bad JSON, mutated /generate bodies, bad weight blobs, HTTP-level
    abuse, and valid canonical requests mixed in (concurrent good clients)."""
    cases = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.10:
            cases.append(Case("random-bytes", rng.randbytes(rng.randrange(1, 3000)), "socket"))
        elif roll < 0.25:
            cases.append(Case("garbage-json", _http("POST", "/generate", _garbage_json(rng)), "4xx"))
        elif roll < 0.55:
            body = json.dumps(_mutated_generate(rng)).encode()
            cases.append(Case("mutated", _http("POST", "/generate", body), "ok_or_4xx"))
        elif roll < 0.65:
            cases.append(Case("weights", _http("POST", "/update_weights", _bad_weights(rng),
                                               "application/octet-stream"), "4xx"))
        elif roll < 0.90:
            cases.append(_http_level(rng))
        else:
            cases.append(Case("valid", _http("POST", "/generate", json.dumps(CANONICAL).encode()), "ok"))
    return cases


# ---- the runner -----------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _check(case: Case, reply: RawReply, reference: list[list[int]]) -> str | None:
    """None when the reply is what the case allows, else what went wrong."""
    if reply.status is None:
        return None if case.expect == "socket" else f"no reply ({reply.error})"
    if reply.status >= 500:
        return f"status {reply.status}: {reply.body[:300]!r}"
    if 400 <= reply.status < 500:
        if case.expect == "ok":
            return f"status {reply.status} for a valid request: {reply.body[:300]!r}"
        if case.data.startswith(b"HEAD "):
            return None  # a HEAD answer may carry no body
        try:
            error = reply.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {reply.status} without a JSON reason: {reply.body[:200]!r}"
        return None if isinstance(error, str) and error else f"empty reason {reply.body[:200]!r}"
    if reply.status == 200 and case.expect in ("ok", "ok_or_4xx"):
        payload = reply.json()
        n_rows = len(payload["completion_ids"])
        if not n_rows or any(len(payload[k]) != n_rows for k in ("prompt_index", "texts", "logprobs", "truncated")):
            return f"malformed 200: {reply.body[:200]!r}"
        if case.expect == "ok" and payload["completion_ids"] != reference:
            return f"wrong completions for the canonical request: {payload['completion_ids']}"
        return None
    return f"unexpected status {reply.status} for a {case.expect} case"


def _slowloris(port: int, seconds: float, results: list) -> None:
    """Trickle an endless header one byte every 0.2 s until the server gives up (bounded by `seconds`)."""
    results.append(trickle_request(HOST, port, b"", b"POST /generate HTTP/1.1\r\nX-Slow: " + b"a" * 1000,
                                   interval=0.2, seconds=seconds))


def run_fuzz(port: int, pid: int, *, count: int, batch: int, seed: int, time_limit: float, alive=lambda: True,
             slowloris_per_batch: int = 0, workers: int = 8) -> dict:
    """Send ``count`` seeded cases in concurrent batches; after each batch check health, the canonical
    completions and memory. Returns statistics for the assertions."""
    model, tok = build_tiny("nano")
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    reference = HFEngine(model, tok).generate(CANONICAL["prompts"], greedy).completion_ids
    rng = random.Random(seed)
    cases = make_cases(rng, count)
    failures: list[str] = []
    statuses: dict[str, int] = {}
    start = time.monotonic()
    http_request(HOST, port, "POST", "/generate", json.dumps(CANONICAL).encode())  # warm up, then the baseline
    baseline = peak = _rss_mb(pid)
    slow_results: list = []
    for first in range(0, len(cases), batch):
        assert time.monotonic() - start < time_limit, f"fuzzing took over {time_limit} s"
        slow = [threading.Thread(target=_slowloris, args=(port, 3 * LIMITS["request_timeout"], slow_results))
                for _ in range(slowloris_per_batch)]
        for t in slow:
            t.start()
        group = cases[first:first + batch]
        with ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(lambda c: raw_request(HOST, port, c.data, half_close=c.half_close, timeout=30),
                                    group))
        for case, reply in zip(group, replies):
            statuses[str(reply.status)] = statuses.get(str(reply.status), 0) + 1
            problem = _check(case, reply, reference)
            if problem:
                failures.append(f"{case.kind}: {problem}; sent {case.data[:120]!r}")
        for t in slow:
            t.join(timeout=30)
        assert alive(), "the server process died"
        health = http_request(HOST, port, "GET", "/health", timeout=10)
        assert health.status == 200 and health.json() == {"status": "ok"}, health
        answer = http_request(HOST, port, "POST", "/generate", json.dumps(CANONICAL).encode(), timeout=30)
        assert answer.status == 200 and answer.json()["completion_ids"] == reference, answer
        peak = max(peak, _rss_mb(pid))
    return {"failures": failures, "statuses": statuses, "baseline_mb": baseline, "peak_mb": peak,
            "seconds": time.monotonic() - start, "slowloris": [r.status for r in slow_results]}


def _assert_ok(stats: dict, count: int) -> None:
    assert not stats["failures"], "\n".join(stats["failures"][:20])
    assert sum(stats["statuses"].values()) == count
    four = sum(v for k, v in stats["statuses"].items() if k.startswith("4"))
    assert four > count // 2 and stats["statuses"].get("200", 0) > 0, stats["statuses"]  # both kinds exercised
    assert stats["peak_mb"] - stats["baseline_mb"] < RSS_GROWTH_MB, stats


def test_fuzz_quick_in_process():
    """~50 requests against an in-process server (no start-up cost), 2 concurrent batches."""
    server = serve_in_thread(ServerLimits(**LIMITS))
    try:
        stats = run_fuzz(server.port, os.getpid(), count=50, batch=25, seed=0, time_limit=40)
    finally:
        stop_in_thread(server)
    _assert_ok(stats, 50)
    assert server.httpd.budget.used == 0  # every reserved body byte was given back


@pytest.mark.slow
def test_fuzz_posttrain_serve_subprocess():
    """400 seeded requests in 8 concurrent batches against `posttrain serve` (HF backend), with 3 slowloris
    clients per batch; the process must stay up with bounded memory and every slow client gets a 408."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    server = start_server("--model", "tiny:nano", "--backend", "hf", "--host", HOST, *flags, "--log-level", "WARNING",
                          cli=True)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        stats = run_fuzz(port, server.proc.pid, count=400, batch=50, seed=1, time_limit=120,
                         alive=lambda: server.proc.poll() is None, slowloris_per_batch=3)
        assert server.proc.poll() is None
        log = server.log()
    finally:
        server.stop()
    _assert_ok(stats, 400)
    assert stats["slowloris"] == [408] * 24, stats["slowloris"]
    assert "Traceback" not in log, log[-3000:]
    print(f"fuzz: {stats['statuses']} in {stats['seconds']:.1f} s, RSS {stats['baseline_mb']:.0f} -> "
          f"{stats['peak_mb']:.0f} MiB")
