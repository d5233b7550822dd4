"""``posttrain serve``: a rollout server process for online methods (``vllm_mode="server"``).

    posttrain serve --model tiny:small --backend vllm --host 127.0.0.1 --port 8000

Standard library only (``http.server`` + ``json``). It binds to loopback unless told otherwise and never
unpickles anything: requests are JSON, weights are safetensors blobs (a JSON header of names, dtypes and
shapes followed by raw little-endian tensor bytes).

Endpoints (all answers are JSON; errors are ``{"error": message}`` with status 400 or 500):

- ``GET /health`` -> ``{"status": "ok"}``
- ``GET /info`` -> backend, model, vocab size, stop token ids, weights version, pid
- ``POST /generate`` ``{"prompts": [[ids...] | "text" | [messages]], "params": {SamplingParams fields}}``
  -> the :class:`~posttrain.online.engines.Rollout` fields
- ``POST /update_weights`` body: a safetensors blob of ``(checkpoint name -> tensor)``, whole decoder
  layers per request (clients send a large model in several requests) -> ``{"loaded": n}``
- ``POST /reset`` -> forget cached prefixes after an update; bumps ``weights_version``

Requests are served one at a time by the engine (a lock), while ``/health`` and ``/info`` stay answerable.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from .engines import RolloutEngine, SamplingParams
from .weights import weights_from_bytes

__all__ = ["RolloutServer", "build_engine", "make_http_server", "serve_main", "main"]

logger = logging.getLogger("posttrain.serve")

MAX_JSON_BYTES = 256 * 2**20


class RequestError(ValueError):
    """A bad request: answered with status 400 and the message."""


class RolloutServer:
    """The endpoints' logic around one engine (no HTTP here, so it is testable directly)."""

    def __init__(self, engine: RolloutEngine, *, backend: str, model: str) -> None:
        self.engine = engine
        self.backend = backend
        self.model = model
        self.weights_version = 0
        self.started = time.time()
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        tokenizer = getattr(self.engine, "tokenizer", None)
        return {
            "backend": self.backend, "model": self.model, "pid": os.getpid(),
            "vocab_size": len(tokenizer) if tokenizer is not None else None,
            "stop_token_ids": list(getattr(self.engine, "stop_token_ids", []) or []),
            "weights_version": self.weights_version, "uptime_s": round(time.time() - self.started, 1),
        }

    def generate(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or "prompts" not in request:
            raise RequestError("POST /generate expects a JSON object with 'prompts' (and optional 'params')")
        prompts = request["prompts"]
        if not isinstance(prompts, list):
            raise RequestError(f"'prompts' must be a list, got {type(prompts).__name__}")
        params = request.get("params") or {}
        if not isinstance(params, dict):
            raise RequestError(f"'params' must be an object of sampling parameters, got {type(params).__name__}")
        try:
            sampling = SamplingParams.from_dict(params)
        except (TypeError, ValueError) as err:
            raise RequestError(str(err)) from None
        with self.lock:
            rollout = self.engine.generate(prompts, sampling)
        return {name: getattr(rollout, name) for name in
                ("prompt_index", "prompt_ids", "completion_ids", "texts", "logprobs", "truncated")}

    def update_weights(self, body: bytes) -> dict[str, Any]:
        try:
            tensors = weights_from_bytes(body)
        except Exception as err:  # safetensors raises its own error types on a malformed header
            raise RequestError(f"POST /update_weights expects a safetensors blob: {err}") from None
        load = getattr(self.engine, "load_named_weights", None)
        if load is None:
            raise RequestError(f"the {self.backend} backend cannot load weights")
        with self.lock:
            try:
                load(list(tensors.items()))
            except (KeyError, ValueError) as err:
                raise RequestError(str(err).strip("'\"")) from None
        return {"loaded": len(tensors)}

    def reset(self) -> dict[str, Any]:
        with self.lock:
            reset = getattr(self.engine, "reset_cache", None)
            if callable(reset):
                reset()
            self.weights_version += 1
        return {"ok": True, "weights_version": self.weights_version}


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "posttrain-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            raise RequestError(f"bad Content-Length {length!r}") from None
        if size < 0 or size > limit:
            raise RequestError(f"request body of {size} bytes is over the limit of {limit} bytes")
        return self.rfile.read(size)

    def _json(self) -> Any:
        try:
            return json.loads(self._body(MAX_JSON_BYTES) or b"{}")
        except json.JSONDecodeError as err:
            raise RequestError(f"request body is not valid JSON: {err}") from None

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        route = routes.get(path)
        if route is None:
            self._reply(404, {"error": f"no endpoint {self.command} {path}; see `posttrain serve --help`"})
            return
        try:
            self._reply(200, route())
        except RequestError as err:
            self._reply(400, {"error": str(err)})
        except Exception as err:  # report, keep serving
            logger.error("%s %s failed:\n%s", self.command, path, traceback.format_exc())
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        app = self.server.app
        self._dispatch({"/health": lambda: {"status": "ok"}, "/info": app.info})

    def do_POST(self) -> None:  # noqa: N802
        app = self.server.app
        self._dispatch({
            "/generate": lambda: app.generate(self._json()),
            "/update_weights": lambda: app.update_weights(self._body(self.server.max_upload_bytes)),
            "/reset": app.reset,
        })


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: RolloutServer, max_upload_bytes: int) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self.max_upload_bytes = max_upload_bytes


def make_http_server(app: RolloutServer, host: str = "127.0.0.1", port: int = 8000,
                     max_upload_mb: int = 8192) -> ThreadingHTTPServer:
    """Bind (port 0 picks a free port; read it from ``server.server_address``)."""
    return _HTTPServer((host, port), app, max_upload_mb * 2**20)


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posttrain serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a rollout server (vLLM, or HF generate) that online trainers use with "
                    "use_vllm=True, vllm_mode='server', vllm_server_url=http://HOST:PORT.",
        epilog="endpoints: GET /health, GET /info, POST /generate, POST /update_weights, POST /reset\n"
               "The server has no authentication: keep it on loopback or a trusted network.")
    p.add_argument("--model", required=True, help="tiny:<spec>, a local folder or a hub name")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"],
                   help="vllm (needs vLLM), hf (transformers generate), auto: vllm when installed")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; loopback by default")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--dtype", default=None, help="HF model dtype (default float32 on CPU)")
    p.add_argument("--vllm-dtype", default="auto", help="vLLM dtype (auto: float32 on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="vLLM KV cache in GiB (default 1 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-batch-size", type=int, default=64, help="hf backend: sequences per generate call")
    p.add_argument("--max-upload-mb", type=int, default=8192, help="largest /update_weights request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="INFO")
    return p


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
    start = time.perf_counter()
    engine, backend = build_engine(args.model, args.backend, args)
    app = RolloutServer(engine, backend=backend, model=args.model)
    httpd = make_http_server(app, args.host, args.port, args.max_upload_mb)
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
