"""Client of a ``posttrain serve`` rollout server (``use_vllm=True, vllm_mode="server"``).

Prompts are tokenized here (the trainer's tokenizer and chat template decide the prompt tokens) and sent
as ids; :meth:`RolloutServerClient.sync_weights` sends the trainer's weights (LoRA merged) as safetensors
blobs of whole decoder layers, about ``chunk_mb`` each, then ``/reset``.

Failures never hang: every request has a socket timeout (``timeout``, the longest wait for any one reply)
and every transport failure becomes a :class:`RolloutServerError` naming the URL and what to check. A
request the server refuses raises :class:`RolloutServerError` with its status and the server's reason
(``err.status``, ``err.reason``). Only a refused connection and a 503 (busy) are retried: the request was
not processed, so retrying is safe. Weight chunks larger than the server's ``--max-upload-mb`` are
refused here, before sending.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

from torch import nn

from .engines import Rollout, RolloutEngine, SamplingParams, encode_prompts
from .weights import chunk_weights, iter_merged_weights, weights_to_bytes

__all__ = ["RolloutServerClient", "RolloutServerError"]

_START_HINT = "start one with `posttrain serve --model ...`"


class RolloutServerError(RuntimeError):
    """The rollout server is unreachable, died, timed out, or refused a request. When it answered,
    ``status`` is the HTTP status and ``reason`` its ``{"error": ...}`` message; both are None otherwise."""

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class RolloutServerClient(RolloutEngine):
    """A :class:`RolloutEngine` backed by a rollout server at ``url``; checks ``/health`` at creation."""

    samples_from_policy = False

    def __init__(self, url: str, tokenizer: Any, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 sync_every: int = 1, chunk_mb: float = 256.0, retries: int = 3,
                 stop_token_ids: Sequence[int] | None = None, weight_timeout: float | None = None) -> None:
        super().__init__(sync_every=sync_every)
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"vllm_server_url={url!r}: expected http://host:port")
        self.url = f"http://{parts.hostname}:{parts.port or 80}"
        self._host, self._port = parts.hostname, parts.port or 80
        self.tokenizer = tokenizer
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        #: socket timeout of each weight-push request (None: ``timeout``); TRL's ``weight_sync_timeout``
        self.weight_timeout = weight_timeout
        self.chunk_bytes = int(chunk_mb * 2**20)
        self.retries = retries
        self.stop_token_ids = list(stop_token_ids or [])
        try:
            self._request("GET", "/health", timeout=connect_timeout, retries=1)
        except RolloutServerError as err:
            raise RolloutServerError(f"no rollout server at {self.url}: {_START_HINT} ({err.__cause__ or err})") \
                from err.__cause__
        self.info = self._request("GET", "/info", timeout=connect_timeout)
        vocab = self.info.get("vocab_size")
        if vocab is not None and vocab != len(tokenizer):
            raise RolloutServerError(f"the rollout server at {self.url} serves {self.info.get('model')!r} with a "
                                     f"tokenizer of {vocab} tokens, but the trainer's has {len(tokenizer)}: "
                                     "start the server with the same model")

    # transport ---------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, *, content_type: str = "application/json",
                 timeout: float | None = None, retries: int | None = None) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        attempts = max(1, self.retries if retries is None else retries)
        for attempt in range(attempts):
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            try:
                headers = {"Content-Type": content_type} if body is not None else {}
                try:
                    conn.request(method, path, body=body, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server answered early (e.g. 413) and closed: its reason is in the reply below
                response = conn.getresponse()
                data = response.read()
                status = response.status
            except ConnectionRefusedError as err:
                if attempt + 1 < attempts:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise RolloutServerError(f"rollout server at {self.url} refused the connection for {method} {path}: "
                                         f"it is not running (any more); {_START_HINT}") from err
            except (socket.timeout, TimeoutError) as err:
                raise RolloutServerError(f"rollout server at {self.url} did not answer {method} {path} within "
                                         f"{timeout:g} s: check that the server process is alive and not stuck "
                                         "(raise vllm_server_timeout for very long generations)") from err
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                raise RolloutServerError(f"rollout server at {self.url} dropped the connection during {method} "
                                         f"{path} ({type(err).__name__}: {err}): it probably died; check its log "
                                         "and memory, then restart it") from err
            finally:
                conn.close()
            try:
                payload = json.loads(data or b"{}")
            except json.JSONDecodeError as err:
                raise RolloutServerError(f"{self.url}{path} answered status {status} with non-JSON data: is it a "
                                         "posttrain rollout server?") from err
            if status == 503 and attempt + 1 < attempts:  # busy: nothing was done, retrying is safe
                time.sleep(0.5 * 2**attempt)
                continue
            if status != 200:
                reason = str(payload.get("error", payload)) if isinstance(payload, dict) else str(payload)
                raise RolloutServerError(f"rollout server at {self.url} rejected {method} {path} (status {status}): "
                                         f"{reason}", status=status, reason=reason)
            return payload
        raise AssertionError("unreachable")

    def _post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, json.dumps(payload).encode())

    # engine API --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> Rollout:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        sent = params.to_dict()
        sent["stop_token_ids"] = list(dict.fromkeys(self.stop_token_ids + list(params.stop_token_ids or [])))
        data = self._post_json("/generate", {"prompts": prompt_ids, "params": sent})
        try:
            completions = [list(map(int, c)) for c in data["completion_ids"]]
            rows = [int(i) for i in data["prompt_index"]]
            rollout = Rollout(prompt_index=rows, prompt_ids=[prompt_ids[i] for i in rows],
                              completion_ids=completions, texts=list(data["texts"]),
                              logprobs=[list(map(float, lp)) for lp in data["logprobs"]],
                              truncated=[bool(t) for t in data["truncated"]]).check()
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise RolloutServerError(f"rollout server at {self.url} sent a malformed /generate answer: {err}") from err
        if len(rollout) != len(prompt_ids) * params.n:
            raise RolloutServerError(f"rollout server at {self.url} sent {len(rollout)} completions for "
                                     f"{len(prompt_ids)} prompts x n={params.n}")
        return rollout

    def _push_weights(self, model: nn.Module) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_rank() == 0:  # one sender; the other ranks wait at the barrier
            self.send_weight_blobs(self.iter_weight_blobs(model))  # streamed: one chunk in memory at a time
        if distributed:
            dist.barrier()

    def iter_weight_blobs(self, model: nn.Module) -> Iterator[bytes]:
        """``model``'s weights (LoRA merged) as the safetensors blobs a sync sends, whole layers each: the part
        of a sync that reads the model. An asynchronous trainer takes ``list(...)`` of them (a snapshot), then
        sends them from another thread with :meth:`send_weight_blobs` while it trains on."""
        limit_mb = (self.info.get("limits") or {}).get("max_upload_mb")
        for chunk in chunk_weights(iter_merged_weights(model), self.chunk_bytes):
            blob = weights_to_bytes(chunk)
            if limit_mb is not None and len(blob) > limit_mb * 2**20:
                raise RolloutServerError(
                    f"a weight chunk of {len(blob) / 2**20:.1f} MiB (layer {chunk[0][0]!r}...) is over the rollout "
                    f"server's --max-upload-mb {limit_mb:g} at {self.url}: a layer is sent whole, so start the "
                    "server with a larger --max-upload-mb")
            yield blob

    def send_weight_blobs(self, blobs: Iterable[bytes]) -> None:
        """Send blobs made by :meth:`iter_weight_blobs`, then ``/reset`` (the server's version goes up by one)."""
        for blob in blobs:
            self._request("POST", "/update_weights", blob, content_type="application/octet-stream",
                          timeout=self.weight_timeout)
        self.reset_cache()

    def reset_cache(self) -> None:
        """Ask the server to drop cached prefixes (done after every weight sync)."""
        self._request("POST", "/reset", b"{}")

    def health(self) -> bool:
        """True when the server answers ``/health`` within ``connect_timeout``."""
        try:
            return self._request("GET", "/health", timeout=self.connect_timeout, retries=1).get("status") == "ok"
        except RolloutServerError:
            return False
