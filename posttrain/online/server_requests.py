"""What the rollout server accepts: its limits, the model facts it checks against, and request validation.

Every request is checked here, before the engine sees it, the same way for every backend (HF or vLLM):
JSON shape and the type of every field, prompt token ids inside the model's vocabulary, ``n``,
``max_new_tokens``, the number of prompts and the total tokens of a request within :class:`ServerLimits`
and the model's context, sampling parameters in range, and weight updates against the model's parameter
names, shapes and dtypes (all of an update is checked before any of it is applied). A bad request raises
:class:`RequestError` with the HTTP status and a message that names the field and what was expected;
the HTTP layer (``server_http``) answers it as ``{"error": message}``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .engines import SamplingParams, encode_prompts
from ..ops.wrappers import unwrap_model
from .weights import _LAYER

__all__ = ["RequestError", "ServerLimits", "ModelFacts", "parse_json", "parse_generate", "parse_sampling",
           "parse_reset", "check_weight_header", "check_weight_values"]

MAX_STOP_TOKEN_IDS = 256
_SEED_RANGE = (0, 2**63 - 1)


class RequestError(ValueError):
    """A request the server refuses: answered with ``status`` (a 4xx) and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServerLimits:
    """The server's own bounds on one request (``posttrain serve --max-...`` flags; defaults in brackets).

    - ``max_prompts`` [4096], ``max_n`` [256]: prompts per ``/generate`` and completions per prompt.
    - ``max_new_tokens`` [None: the context]: the largest ``params.max_new_tokens``.
    - ``max_total_tokens`` [2**21]: ``n * sum over prompts of (prompt tokens + max_new_tokens)``, the most
      tokens one request may make the engine hold.
    - ``max_model_len`` [None: the model's context]: prompt + ``max_new_tokens`` per sequence; may not
      exceed the model's context.
    - ``max_request_mb`` [16]: JSON bodies (``/generate``, ``/reset``); ``max_upload_mb`` [8192]: one
      ``/update_weights`` body; ``max_buffered_mb`` [None: upload + 4 x request]: all request bodies being
      received at once, together (beyond it a request is answered 503, server busy).
    - ``request_timeout`` [30 s]: a client must send its whole request (line, headers, body) within this
      time plus 1 s per MiB of body; a socket silent for this long is dropped. ``max_connections`` [64]: connections served at once (more are answered 503).
    """

    max_prompts: int = 4096
    max_n: int = 256
    max_new_tokens: int | None = None
    max_total_tokens: int = 2**21
    max_model_len: int | None = None
    max_request_mb: float = 16.0
    max_upload_mb: float = 8192.0
    max_buffered_mb: float | None = None
    request_timeout: float = 30.0
    max_connections: int = 64

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_n", "max_total_tokens", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name}={getattr(self, name)!r}: expected an integer >= 1")
        for name in ("max_new_tokens", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name}={getattr(self, name)!r}: expected None or an integer >= 1")
        for name in ("max_request_mb", "max_upload_mb", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name}={getattr(self, name)!r}: expected a number > 0")
        if self.max_buffered_mb is not None and self.max_buffered_mb < max(self.max_request_mb, self.max_upload_mb):
            raise ValueError(f"ServerLimits.max_buffered_mb={self.max_buffered_mb}: expected at least the largest "
                             f"single body (max_request_mb={self.max_request_mb}, max_upload_mb={self.max_upload_mb})")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_buffered_bytes(self) -> int:
        mb = self.max_buffered_mb if self.max_buffered_mb is not None else self.max_upload_mb + 4 * self.max_request_mb
        return int(mb * 2**20)


@dataclass
class ModelFacts:
    """What requests are checked against: ``vocab_size`` (token ids are in ``[0, vocab_size)``: the rows of
    the model's embedding), ``context_length`` (prompt + completion), ``weight_specs`` (parameter name ->
    (shape, dtype), tied aliases included; None: names are left to the backend), and ``whole_layers``
    (every decoder layer an update touches must come whole, as vLLM's layerwise reload needs)."""

    vocab_size: int | None = None
    context_length: int | None = None
    weight_specs: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
    whole_layers: bool = False

    @classmethod
    def from_model(cls, model: nn.Module | None, *, config: Any = None, tokenizer: Any = None,
                   whole_layers: bool = False) -> "ModelFacts":
        """From an HF model (or only its config, e.g. for a vLLM backend started from a hub name)."""
        specs = None
        vocab = None
        if model is not None:
            model = unwrap_model(model)
            config = getattr(model, "config", config)
            specs = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters(remove_duplicate=False)}
            embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            weight = getattr(embedding, "weight", None)
            vocab = int(weight.shape[0]) if weight is not None else None
        elif config is not None:
            specs = _specs_from_config(config)
        if vocab is None:
            vocab = getattr(config, "vocab_size", None) or (len(tokenizer) if tokenizer is not None else None)
        return cls(vocab_size=vocab, context_length=context_of(config), weight_specs=specs, whole_layers=whole_layers)

    @classmethod
    def from_engine(cls, engine: Any, backend: str) -> "ModelFacts":
        """From a serving engine: the HF engine's model, or a vLLM engine's checkpoint folder and its
        ``max_model_len`` (duck-typed, so that no backend is imported here). vLLM reloads whole layers."""
        tokenizer = getattr(engine, "tokenizer", None)
        model = getattr(engine, "model", None)
        if isinstance(model, nn.Module):
            return cls.from_model(model, tokenizer=tokenizer, whole_layers=backend == "vllm")
        config = None
        path = getattr(engine, "model_path", None)
        if path:
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(path)
            except Exception:  # noqa: BLE001 (an unreadable config only loses the name checks)
                config = None
        facts = cls.from_model(None, config=config, tokenizer=tokenizer, whole_layers=backend == "vllm")
        try:
            facts.context_length = int(engine.llm.llm_engine.model_config.max_model_len)
        except (AttributeError, TypeError, ValueError):
            pass
        return facts


def context_of(config: Any) -> int | None:
    """The model's context length from its config (``max_position_embeddings`` and its other names)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _specs_from_config(config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
    """Parameter names and shapes of the model a config describes, built on the meta device (no memory)."""
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build: leave the names to the backend
        return None
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters(remove_duplicate=False)}


# ---- JSON -------------------------------------------------------------------------------------------

def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes | bytearray, endpoint: str) -> Any:
    """Strict JSON (UTF-8, no NaN/Infinity); an empty body is ``{}``."""
    if not body.strip():
        return {}
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise RequestError(f"{endpoint}: the body is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise RequestError(f"{endpoint}: the JSON body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, integers of more than 4300 digits
        raise RequestError(f"{endpoint}: the body is not valid JSON: {str(err)[:200]}") from None


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                         list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, field: str, low: int, high: float, expected: str) -> int:
    if not _is_int(value) or not low <= value <= high:
        shown = repr(value) if isinstance(value, float) or (_is_int(value) and abs(value) < 10**30) else _kind(value)
        raise RequestError(f"{field}={shown}: expected {expected}")
    return int(value)


def _number(value: Any, field: str, ok: Any, expected: str) -> float:
    number = float(value) if isinstance(value, float) or (_is_int(value) and abs(value) < 10**300) else math.nan
    if not math.isfinite(number) or not ok(number):
        shown = repr(value) if isinstance(value, float) or (_is_int(value) and abs(value) < 10**30) else _kind(value)
        raise RequestError(f"{field}={shown}: expected {expected}")
    return number


def _fits(limit: int | None) -> float:
    return math.inf if limit is None else limit


# ---- /generate --------------------------------------------------------------------------------------

def parse_sampling(params: Any, *, vocab_size: int | None, max_n: int, max_new_tokens: float) -> SamplingParams:
    """``params`` of a ``/generate`` request -> :class:`SamplingParams`, every field type- and range-checked.
    ``top_k``: an integer >= 0 (0 is off; -1 and null are accepted as off too, as vLLM writes it)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError(f"params: expected an object of sampling parameters, got {_kind(params)}")
    known = SamplingParams.__dataclass_fields__
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise RequestError(f"params: unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
    out: dict[str, Any] = {}
    for name, value in params.items():
        field = f"params.{name}"
        if name == "n":
            out[name] = _int(value, field, 1, max_n, f"an integer in [1, {max_n}] (the server's --max-n)")
        elif name == "max_new_tokens":
            high = max_new_tokens
            out[name] = _int(value, field, 1, high, f"an integer in [1, {high:g}] (the server's --max-new-tokens "
                                                    "and the model's context)")
        elif name == "temperature":
            out[name] = _number(value, field, lambda v: v >= 0, "a finite number >= 0 (0 is greedy)")
        elif name == "top_p":
            out[name] = _number(value, field, lambda v: 0 < v <= 1, "a number in (0, 1]")
        elif name == "top_k":
            if value is None or value == -1 and _is_int(value):
                value = 0
            out[name] = _int(value, field, 0, 2**31 - 1, "an integer >= 0 (0, -1 or null: off)")
        elif name == "min_p":
            out[name] = _number(value, field, lambda v: 0 <= v <= 1, "a number in [0, 1]")
        elif name == "repetition_penalty":
            out[name] = _number(value, field, lambda v: v > 0, "a finite number > 0 (1 is off)")
        elif name == "stop_on_eos":
            if not isinstance(value, bool):
                raise RequestError(f"{field}: expected true or false, got {_kind(value)}")
            out[name] = value
        elif name == "seed":
            out[name] = None if value is None else _int(value, field, *_SEED_RANGE, f"null or an integer in "
                                                                                 f"[0, 2**63 - 1]")
        elif name == "stop_token_ids":
            out[name] = None if value is None else _token_ids(value, field, vocab_size, MAX_STOP_TOKEN_IDS,
                                                              allow_empty=True)
    sampling = SamplingParams(**out)
    if "max_new_tokens" not in out and sampling.max_new_tokens > max_new_tokens:  # the dataclass default
        raise RequestError(f"params.max_new_tokens is missing and its default {sampling.max_new_tokens} is over "
                           f"the server's bound of {max_new_tokens:g}: send max_new_tokens")
    return sampling


def _token_ids(value: Any, field: str, vocab_size: int | None, max_len: float, *, allow_empty: bool = False,
               why: str = "") -> list[int]:
    if not isinstance(value, list):
        raise RequestError(f"{field}: expected a list of token ids, got {_kind(value)}")
    if len(value) > max_len:
        raise RequestError(f"{field}: {len(value)} token ids, more than the {max_len:g} allowed{why}")
    if not value and not allow_empty:
        raise RequestError(f"{field} is empty: expected at least one token id")
    high = vocab_size if vocab_size is not None else 2**63
    for j, tok in enumerate(value):
        if not _is_int(tok) or not 0 <= tok < high:
            shown = repr(tok) if (_is_int(tok) and abs(tok) < 10**30) or isinstance(tok, float) else _kind(tok)
            raise RequestError(f"{field}[{j}]={shown}: expected a token id, an integer in [0, {high}) "
                               "(the model's vocabulary)")
    return list(value)


def _prompt_ids(prompt: Any, i: int, tokenizer: Any, vocab_size: int | None, max_len: float, why: str) -> list[int]:
    """One prompt (token ids, text, or a conversation) -> checked token ids."""
    field = f"prompts[{i}]"
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for k, message in enumerate(prompt):
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise RequestError(f"{field}[{k}].{key}: a conversation message needs a string {key!r}, "
                                       f"got {_kind(message.get(key))}")
    elif isinstance(prompt, list):
        return _token_ids(prompt, field, vocab_size, max_len, why=why)
    elif isinstance(prompt, str):
        if not prompt:
            raise RequestError(f"{field} is an empty string")
    else:
        raise RequestError(f"{field}: expected a list of token ids, a string or a list of messages, "
                           f"got {_kind(prompt)}")
    if tokenizer is None:
        raise RequestError(f"{field}: this server has no tokenizer; send token ids")
    try:
        ids = encode_prompts(tokenizer, [prompt])[0]
    except Exception as err:  # tokenizer or chat-template errors on user text are the request's fault
        raise RequestError(f"{field} could not be tokenized: {type(err).__name__}: {str(err)[:200]}") from None
    return _token_ids(ids, f"{field} (tokenized)", vocab_size, max_len, why=why)


def parse_generate(request: Any, *, limits: ServerLimits, facts: ModelFacts,
                   tokenizer: Any = None) -> tuple[list[list[int]], SamplingParams]:
    """A ``/generate`` body -> (prompt token ids, sampling parameters), or :class:`RequestError`."""
    if not isinstance(request, dict):
        raise RequestError(f'POST /generate: expected a JSON object {{"prompts": [...], "params": {{...}}}}, '
                           f"got {_kind(request)}")
    unknown = sorted(set(request) - {"prompts", "params"})
    if unknown:
        raise RequestError(f"POST /generate: unknown field(s) {unknown}; expected 'prompts' and 'params'")
    if "prompts" not in request:
        raise RequestError("POST /generate: missing 'prompts' (a list of prompts: token ids, strings or conversations)")
    prompts = request["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError(f"prompts: expected a non-empty list of prompts, got "
                           f"{'an empty list' if prompts == [] else _kind(prompts)}")
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"prompts: {len(prompts)} prompts, more than the server's --max-prompts "
                           f"{limits.max_prompts}")
    context = min(_fits(limits.max_model_len), _fits(facts.context_length))
    max_new = min(_fits(limits.max_new_tokens), context - 1)
    params = parse_sampling(request.get("params"), vocab_size=facts.vocab_size, max_n=limits.max_n,
                            max_new_tokens=max_new)
    max_prompt = min(context - params.max_new_tokens, limits.max_total_tokens)
    why = (f" (the context of {context:g} tokens minus max_new_tokens={params.max_new_tokens})"
           if max_prompt < limits.max_total_tokens else " (the server's --max-total-tokens)")
    ids = [_prompt_ids(p, i, tokenizer, facts.vocab_size, max_prompt, why) for i, p in enumerate(prompts)]
    total = params.n * sum(len(p) + params.max_new_tokens for p in ids)
    if total > limits.max_total_tokens:
        raise RequestError(f"POST /generate: {len(ids)} prompts x n={params.n} x (prompt tokens + max_new_tokens="
                           f"{params.max_new_tokens}) is {total} tokens, more than the server's --max-total-tokens "
                           f"{limits.max_total_tokens}: send fewer prompts or a smaller n or max_new_tokens")
    return ids, params


def parse_reset(request: Any) -> None:
    """``/reset`` takes an empty body or ``{}``."""
    if request != {}:
        raise RequestError(f"POST /reset: expected an empty body or {{}}, got {str(request)[:100]}")


# ---- /update_weights --------------------------------------------------------------------------------

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def check_weight_header(body: bytes | bytearray, facts: ModelFacts) -> list[str]:
    """Check a safetensors blob's header (names, shapes, dtypes) against the model before any tensor is built;
    returns the names. The blob's byte layout is checked again by safetensors when it is loaded."""
    where = "POST /update_weights"
    if len(body) < 8:
        raise RequestError(f"{where}: expected a safetensors blob (8-byte header size, JSON header, tensor bytes), "
                           f"got {len(body)} bytes")
    (size,) = struct.unpack("<Q", bytes(body[:8]))
    if size > min(len(body) - 8, _MAX_HEADER):
        raise RequestError(f"{where}: expected a safetensors blob: its header size {size} is beyond the "
                           f"{len(body)}-byte body")
    try:
        header = json.loads(bytes(body[8:8 + size]).decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise RequestError(f"{where}: expected a safetensors blob: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise RequestError(f"{where}: expected a safetensors blob: its header is not a JSON object")
    names = [name for name in header if name != "__metadata__"]
    if not names:
        raise RequestError(f"{where}: the blob holds no tensors")
    specs = facts.weight_specs
    for name in names:
        entry = header[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or \
                not all(_is_int(d) and d >= 0 for d in entry["shape"]):
            raise RequestError(f"{where}: weight {name!r}: expected a header entry with 'dtype', 'shape' and "
                               "'data_offsets'")
        dtype, shape = _DTYPES.get(entry.get("dtype")), tuple(entry["shape"])
        if specs is None:
            if dtype is None or not dtype.is_floating_point:
                raise RequestError(f"{where}: weight {name!r} has dtype {entry.get('dtype')!r}: expected a "
                                   "floating-point dtype (F32, BF16, F16, ...)")
            continue
        if name not in specs:
            raise RequestError(f"{where}: weight {name!r} is not a parameter of the served model (its names look "
                               f"like {next(iter(specs), '?')!r})")
        want_shape, want_dtype = specs[name]
        if shape != want_shape:
            raise RequestError(f"{where}: weight {name!r}: shape {shape} does not match the model's {want_shape}")
        if dtype is None or (dtype != want_dtype and not (dtype.is_floating_point and want_dtype.is_floating_point)):
            raise RequestError(f"{where}: weight {name!r} has dtype {entry.get('dtype')!r}: expected "
                               f"{'a floating-point dtype' if want_dtype.is_floating_point else want_dtype} "
                               f"(the model's is {want_dtype})")
    if facts.whole_layers and specs is not None:
        _check_whole_layers(set(names), specs)
    return names


def _check_whole_layers(names: set[str], specs: Mapping[str, Any]) -> None:
    """Every decoder layer (``...layers.N.``) an update touches comes with all its parameters."""
    layers: dict[str, set[str]] = {}
    for name in specs:
        match = _LAYER.match(name)
        if match:
            layers.setdefault(match.group(1), set()).add(name)
    for key in sorted({m.group(1) for m in map(_LAYER.match, names) if m}):
        missing = sorted(layers.get(key, set()) - names)
        if missing:
            raise RequestError(f"POST /update_weights: layer {key!r} is incomplete (missing {missing[:4]}); this "
                               "backend reloads whole layers, send each layer in one request")


def check_weight_values(tensors: Mapping[str, Tensor]) -> None:
    """Every weight finite (a NaN or inf would poison every later completion silently)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RequestError(f"POST /update_weights: weight {name!r} holds NaN or infinite values; nothing was "
                               "applied")
