"""``posttrain serve``: a rollout server process for online methods (``vllm_mode="server"``).

    posttrain serve --model tiny:small --backend vllm --host 127.0.0.1 --port 8000

Standard library only (``http.server`` + ``json``). It binds to loopback unless told otherwise and never
unpickles anything: requests are JSON, weights are safetensors blobs (a JSON header of names, dtypes and
shapes followed by raw little-endian tensor bytes).

Endpoints (every answer is JSON; an error is ``{"error": reason}``, see ``server_http`` for the statuses):

- ``GET /health`` -> ``{"status": "ok"}``
- ``GET /info`` -> backend, model, vocab size, stop token ids, weights version, pid, the request limits
- ``POST /generate`` ``{"prompts": [[ids...] | "text" | [messages]], "params": {SamplingParams fields}}``
  -> the :class:`~posttrain.online.engines.Rollout` fields
- ``POST /update_weights`` body: a safetensors blob of ``(checkpoint name -> tensor)``, whole decoder
  layers per request (clients send a large model in several requests) -> ``{"loaded": n}``
- ``POST /reset`` -> forget cached prefixes after an update; bumps ``weights_version``

It is a long-lived service that several clients share: every request is validated against the model and
the server's :class:`~posttrain.online.server_requests.ServerLimits` before the engine sees it (the same
for every backend), and no request, however malformed, large or slow, can crash it, exhaust its memory
or wedge it for the others (``server_http``). Generation and weight loading are serialized by a lock;
``/health`` and ``/info`` stay answerable meanwhile.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, fields
from typing import Any, Sequence

from .engines import RolloutEngine
from .server_http import Endpoint, RolloutHTTPServer
from .server_requests import (ModelFacts, RequestError, ServerLimits, check_weight_header, check_weight_values,
                              parse_generate, parse_reset)
from .weights import weights_from_bytes

__all__ = ["RolloutServer", "ServerLimits", "RequestError", "build_engine", "make_http_server", "serve_main",
           "main"]

logger = logging.getLogger("posttrain.serve")


class RolloutServer:
    """The endpoints' logic around one engine (no HTTP here, so it is testable directly).

    ``limits``: the server's bounds on a request (default :class:`ServerLimits`); ``facts``: the model's
    vocabulary, context and parameter specs that requests are checked against (default: read from the
    engine, see :meth:`ModelFacts.from_engine`). ``limits.max_model_len`` may not exceed the model's context.
    """

    def __init__(self, engine: RolloutEngine, *, backend: str, model: str, limits: ServerLimits | None = None,
                 facts: ModelFacts | None = None) -> None:
        self.engine = engine
        self.backend = backend
        self.model = model
        self.limits = limits if limits is not None else ServerLimits()
        self.facts = facts if facts is not None else ModelFacts.from_engine(engine, backend)
        context = self.facts.context_length
        if self.limits.max_model_len is not None and context is not None and self.limits.max_model_len > context:
            raise ValueError(f"max_model_len={self.limits.max_model_len} is beyond the model's context of {context} "
                             "tokens")
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.weights_version = 0
        self.started = time.time()
        self.lock = threading.Lock()

    def routes(self) -> dict[str, dict[str, Endpoint]]:
        """Path -> method -> endpoint, for :class:`~posttrain.online.server_http.RolloutHTTPServer`."""
        json_limit, upload_limit = self.limits.max_request_bytes, self.limits.max_upload_bytes
        return {
            "/health": {"GET": Endpoint("none", lambda _: self.health())},
            "/info": {"GET": Endpoint("none", lambda _: self.info())},
            "/generate": {"POST": Endpoint("json", self.generate, json_limit, "--max-request-mb")},
            "/update_weights": {"POST": Endpoint("binary", self.update_weights, upload_limit, "--max-upload-mb")},
            "/reset": {"POST": Endpoint("json", self.reset, json_limit, "--max-request-mb")},
        }

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def info(self) -> dict[str, Any]:
        tokenizer = self.tokenizer
        limits = asdict(self.limits)
        limits.update(vocab_size=self.facts.vocab_size, context_length=self.facts.context_length)
        return {
            "backend": self.backend, "model": self.model, "pid": os.getpid(),
            "vocab_size": len(tokenizer) if tokenizer is not None else None,
            "stop_token_ids": list(getattr(self.engine, "stop_token_ids", []) or []),
            "weights_version": self.weights_version, "uptime_s": round(time.time() - self.started, 1),
            "limits": limits,
        }

    def generate(self, request: Any) -> dict[str, Any]:
        """``request``: the parsed ``/generate`` body; validated (:func:`parse_generate`), then generated."""
        prompt_ids, sampling = parse_generate(request, limits=self.limits, facts=self.facts, tokenizer=self.tokenizer)
        with self.lock:
            rollout = self.engine.generate(prompt_ids, sampling)
        return {name: getattr(rollout, name) for name in
                ("prompt_index", "prompt_ids", "completion_ids", "texts", "logprobs", "truncated")}

    def update_weights(self, body: bytes | bytearray) -> dict[str, Any]:
        """Check the whole update (names, shapes, dtypes, then finite values) before any of it is applied."""
        check_weight_header(body, self.facts)
        load = getattr(self.engine, "load_named_weights", None)
        if load is None:
            raise RequestError(f"the {self.backend} backend cannot load weights")
        try:
            tensors = weights_from_bytes(bytes(body))
        except Exception as err:  # safetensors raises its own error types on a malformed blob
            raise RequestError(f"POST /update_weights: expected a safetensors blob: {str(err)[:300]}") from None
        check_weight_values(tensors)
        with self.lock:
            try:
                load(list(tensors.items()))
            except (KeyError, ValueError) as err:  # a backend's own check (when the names were not known here)
                raise RequestError(str(err).strip("'\"")) from None
        return {"loaded": len(tensors)}

    def reset(self, request: Any = None) -> dict[str, Any]:
        parse_reset({} if request is None else request)
        with self.lock:
            reset = getattr(self.engine, "reset_cache", None)
            if callable(reset):
                reset()
            self.weights_version += 1
        return {"ok": True, "weights_version": self.weights_version}


def make_http_server(app: RolloutServer, host: str = "127.0.0.1", port: int = 8000,
                     max_upload_mb: float | None = None) -> RolloutHTTPServer:
    """Bind (port 0 picks a free port; read it from ``server.server_address``). The limits are
    ``app.limits`` (``max_upload_mb``, when given, replaces its upload limit)."""
    if max_upload_mb is not None:
        values = asdict(app.limits)
        values["max_upload_mb"] = max_upload_mb
        app.limits = ServerLimits(**values)
    return RolloutHTTPServer((host, port), app.routes(), app.limits)


def build_engine(model: str, backend: str, args: argparse.Namespace) -> tuple[RolloutEngine, str]:
    """Load ``model`` (``tiny:<spec>``, a folder or a hub name) behind ``backend`` ("vllm", "hf" or "auto")."""
    from posttrain.models import load_model, load_tokenizer

    from .engine_vllm import vllm_available

    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    tokenizer = load_tokenizer(model)
    if backend == "hf":
        from .engine_hf import HFEngine

        return HFEngine(load_model(model, dtype=args.dtype), tokenizer, max_batch_size=args.max_batch_size), backend
    if backend != "vllm":
        raise SystemExit(f"error: --backend {backend!r}: expected vllm, hf or auto")
    from .engine_vllm import VLLMEngine

    source: Any = load_model(model, dtype=args.dtype) if model.startswith("tiny:") else model
    engine = VLLMEngine(source, tokenizer, gpu_memory_utilization=args.gpu_memory_utilization,
                        kv_cache_gb=args.kv_cache_gb, dtype=args.vllm_dtype, enforce_eager=args.enforce_eager,
                        max_model_len=args.max_model_len, seed=args.seed, sync_on_start=False)
    return engine, backend


_EPILOG = """\
endpoints: GET /health, GET /info, POST /generate, POST /update_weights, POST /reset

Every request is validated before the engine sees it: the JSON shape and the type of every field, prompt
token ids in [0, vocab size), n, max_new_tokens, the number of prompts and the request's total tokens
(prompts x n x (prompt + max_new_tokens)) within the request limits above and the model's context, sampling
parameters in range (temperature >= 0, top_p in (0, 1], top_k >= 0 with 0/-1/null off, min_p in [0, 1],
repetition_penalty > 0, seed null or an integer in [0, 2**63)), and weight updates against the model's
parameter names, shapes and dtypes (and finite values) before any of it is applied.

Errors are JSON {"error": reason} naming the field and what was expected: 400 bad request, 404 unknown
path, 405 wrong method, 408 request too slow, 411 no Content-Length, 413 body too large, 415 wrong
Content-Type, 500 the engine failed (logged; the server keeps serving), 503 busy (retry).

The server has no authentication: keep it on loopback or a trusted network."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a rollout server (vLLM, or HF generate) that online trainers use with "
                    "use_vllm=True, vllm_mode='server', vllm_server_url=http://HOST:PORT.",
        epilog=_EPILOG)
    p.add_argument("--model", required=True, help="tiny:<spec>, a local folder or a hub name")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"],
                   help="vllm (needs vLLM), hf (transformers generate), auto: vllm when installed")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; loopback by default")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--dtype", default=None, help="HF model dtype (default float32 on CPU)")
    p.add_argument("--vllm-dtype", default="auto", help="vLLM dtype (auto: float32 on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="vLLM KV cache in GiB (default 1 on CPU)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-batch-size", type=int, default=64, help="hf backend: sequences per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads of this process (default: torch's; a trainer that starts its own "
                        "worker passes 1, so generator and trainer get a core each)")
    p.add_argument("--log-level", default="INFO")
    limits = p.add_argument_group("request limits (a request beyond one is answered 4xx with the reason)")
    d = ServerLimits()
    limits.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + completion tokens per sequence (default: the model's context; not beyond "
                             "it); vllm: also vLLM's max_model_len")
    limits.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="largest params.max_new_tokens (default: the context allows)")
    limits.add_argument("--max-n", type=int, default=d.max_n, help=f"largest params.n (default {d.max_n})")
    limits.add_argument("--max-prompts", type=int, default=d.max_prompts,
                        help=f"prompts per /generate (default {d.max_prompts})")
    limits.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                        help="prompts x n x (prompt + max_new_tokens) per /generate (default %(default)s)")
    limits.add_argument("--max-request-mb", type=float, default=d.max_request_mb,
                        help="largest JSON body (/generate, /reset), MiB (default %(default)s)")
    limits.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                        help="largest /update_weights body, MiB (default %(default)s)")
    limits.add_argument("--max-buffered-mb", type=float, default=None,
                        help="all bodies being received at once, MiB; beyond: 503 (default upload + 4 x request)")
    limits.add_argument("--request-timeout", type=float, default=d.request_timeout,
                        help="seconds a client has to send a request (+ 1 s per MiB of body); a socket silent "
                             "this long is dropped (default %(default)s)")
    limits.add_argument("--max-connections", type=int, default=d.max_connections,
                        help="connections served at once; more get 503 (default %(default)s)")
    return p


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The :class:`ServerLimits` of parsed ``posttrain serve`` flags (a bad value exits with its message)."""
    try:
        return ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``posttrain serve``: load, bind, print the URL, serve until SIGINT/SIGTERM."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        logger.warning("binding to %s: anyone who can reach it can replace the weights; the server has no "
                       "authentication, keep it on a trusted network", args.host)
    limits = limits_from_args(args)
    if args.num_threads and args.backend == "vllm":
        logger.warning("--num-threads applies to the HF backend; vLLM's CPU backend sizes its own thread pool")
    elif args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    engine, backend = build_engine(args.model, args.backend, args)
    try:
        app = RolloutServer(engine, backend=backend, model=args.model, limits=limits)
    except ValueError as err:
        engine.close()
        raise SystemExit(f"error: {err}") from None
    httpd = make_http_server(app, args.host, args.port)
    host, port = httpd.server_address[:2]
    print(f"posttrain serve: {backend} backend for {args.model} listening on http://{host}:{port} "
          f"(ready in {time.perf_counter() - start:.1f} s)", flush=True)

    def stop(signum: int, _frame: Any) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine.close()
    return 0


def main() -> None:
    sys.exit(serve_main())


if __name__ == "__main__":
    main()
