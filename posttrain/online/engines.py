"""The rollout engine every online method gets its completions from.

One interface (:class:`RolloutEngine`), three backends:

- :class:`~posttrain.online.engine_hf.HFEngine` (default): decodes with the training model itself (our own
  loop, or ``model.generate``), so it always samples from the current policy (``samples_from_policy=True``).
- :class:`~posttrain.online.engine_vllm.VLLMEngine`: vLLM colocated in the training process
  (``use_vllm=True, vllm_mode="colocate"``); weights are copied into it by :meth:`sync_weights`.
- :class:`~posttrain.online.client.RolloutServerClient`: a ``posttrain serve`` process
  (``vllm_mode="server"``); weights travel over HTTP as safetensors bytes.

This module is the interface the backends implement and import; it imports none of them.
:func:`~posttrain.online.engine_factory.make_engine` picks and builds one from a config.

Log-prob convention (every backend): ``Rollout.logprobs[i][t]`` is the log-probability of the sampled
token under the distribution the sampler drew it from: the model's logits after repetition penalty,
divided by the temperature, then restricted by min-p, top-k and top-p and renormalized. With the usual
RL settings (no penalty, top_k=0, top_p=1, min_p=0) this is exactly ``log_softmax(logits / T)``, the
quantity the trainer computes with ``posttrain.ops.token_logps(..., temperature=T)``, so importance
ratios are 1 when the sampler is the policy. Greedy decoding (``temperature=0``) reports
``log_softmax(logits)`` (temperature 1).

Trainers call ``engine.sync_weights(model)`` after every optimizer step; engines that are not the policy
copy weights only every ``sync_every``-th call (``force=True`` copies now).
"""

from __future__ import annotations

import abc
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence, Union

from torch import nn

from ..ops.wrappers import unwrap_model

__all__ = ["SamplingParams", "Rollout", "RolloutEngine", "OnlineEngineArgs", "encode_prompts",
           "default_stop_token_ids", "Prompt"]

#: A prompt: plain text, a conversation (list of {"role", "content"} dicts) or token ids.
Prompt = Union[str, list[dict], list[int]]


@dataclass
class SamplingParams:
    """How to sample completions. ``top_k=0`` and ``min_p=0`` are off; ``temperature=0`` is greedy.

    Beyond the contract: ``stop_token_ids`` are extra token ids that end a completion (added to the
    engine's EOS ids) when ``stop_on_eos`` is set.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    stop_on_eos: bool = True
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 is off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 is off)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {expected}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingParams":
        """Build from a JSON mapping; unknown keys are an error naming the key (not silently dropped)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))


@dataclass
class Rollout:
    """Completions grouped by prompt: prompt i's ``n`` completions are contiguous.

    Every list has one entry per completion. ``prompt_ids[j]`` are the token ids of completion j's prompt
    (the same list object for the ``n`` completions of one prompt), ``prompt_index[j]`` its position in
    the ``prompts`` given to ``generate``. ``completion_ids[j]`` includes the stop token when there was
    one; ``texts[j]`` is its decoding without special tokens. ``logprobs`` follow the module docstring's
    convention. ``truncated[j]`` is True when the completion does not end with a stop token (it ran into
    ``max_new_tokens``).
    """

    prompt_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    #: Multi-turn rollouts (`posttrain.online.multiturn`) only, else None. ``tool_mask[j][t]`` is 1 where
    #: completion token t was generated by the model, 0 where it is tool output or template text between
    #: turns (in the sequence, out of the loss); ``messages[j]`` the completion as messages (assistant turns
    #: with their ``tool_calls``, tool results), what reward functions get; ``environments[j]`` its
    #: environment instance; ``extra_fields`` per-completion values a ``rollout_func`` returned.
    tool_mask: list[list[int]] | None = None
    messages: list[list[dict]] | None = None
    environments: list[Any] | None = None
    extra_fields: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, index: Sequence[int], prompt_index: Sequence[int] | None = None) -> "Rollout":
        """The completions at ``index`` (optional per-completion fields too), with ``prompt_index`` when given."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[j] for j in index]

        extra = None if self.extra_fields is None else {k: pick(v) for k, v in self.extra_fields.items()}
        return Rollout(list(prompt_index) if prompt_index is not None else pick(self.prompt_index),
                       pick(self.prompt_ids), pick(self.completion_ids), pick(self.texts), pick(self.logprobs),
                       pick(self.truncated), pick(self.tool_mask), pick(self.messages), pick(self.environments), extra)

    @classmethod
    def concat(cls, parts: Sequence["Rollout"], prompt_index: list[int]) -> "Rollout":
        """One rollout from several, renumbered by ``prompt_index`` (optional fields kept when every part has them)."""
        def join(name: str) -> list | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else [x for v in values for x in v]

        extra = None
        if all(p.extra_fields is not None for p in parts):
            extra = {k: [x for p in parts for x in p.extra_fields[k]] for k in parts[0].extra_fields}
        return cls(prompt_index, *(join(n) for n in ("prompt_ids", "completion_ids", "texts", "logprobs", "truncated",
                                                     "tool_mask", "messages", "environments")), extra)

    def check(self) -> "Rollout":
        """Raise ValueError if the lists disagree in length (a backend bug); return self."""
        n = len(self.completion_ids)
        for name in ("prompt_index", "prompt_ids", "texts", "logprobs", "truncated"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Rollout.{name} has {len(getattr(self, name))} entries for {n} completions")
        for j, (ids, lps) in enumerate(zip(self.completion_ids, self.logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"Rollout row {j}: {len(ids)} completion ids but {len(lps)} log-probs")
        for name in ("tool_mask", "messages", "environments"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"Rollout.{name} has {len(values)} entries for {n} completions")
        for j, (ids, mask) in enumerate(zip(self.completion_ids, self.tool_mask or [])):
            if len(ids) != len(mask):
                raise ValueError(f"Rollout row {j}: {len(ids)} completion ids but {len(mask)} tool-mask entries")
        for key, values in (self.extra_fields or {}).items():
            if len(values) != n:
                raise ValueError(f"Rollout.extra_fields[{key!r}] has {len(values)} entries for {n} completions")
        return self


def encode_prompts(tokenizer: Any, prompts: Sequence[Any],
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> list[list[int]]:
    """Token ids for each prompt: a string is plain text (tokenized with the tokenizer's own special tokens,
    e.g. BOS), a list of dicts a conversation (chat template with the generation prompt, and the template
    variables ``chat_template_kwargs``, e.g. ``{"enable_thinking": False}``), a list of ints ids."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a sequence of prompts, not a single string")
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, Mapping) for m in prompt):
            for m in prompt:
                if "role" not in m or "content" not in m:
                    raise ValueError(f"prompt {i}: a conversation message needs 'role' and 'content', got {dict(m)}")
            text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False,
                                                 **dict(chat_template_kwargs or {}))
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"prompt {i}: expected a string, a list of message dicts or a list of token ids, "
                            f"got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        out.append(ids)
    return out


def default_stop_token_ids(tokenizer: Any, model: nn.Module | str | os.PathLike | None = None, *,
                           end_of_turn: bool = False) -> list[int]:
    """The token ids that end a completion (the one place that decides them), in this order, each once:

    - the tokenizer's EOS;
    - the EOS ids of the model's generation config (e.g. a chat model's end of turn): a model object's
      ``generation_config``, or for a checkpoint folder / hub name its ``generation_config.json`` when it has one;
    - with ``end_of_turn``, the token with which the tokenizer's chat template closes an assistant turn
      (`posttrain.data.end_of_turn`, e.g. ``<|im_end|>``), when that marker is one token: a conversation's
      reply ends there even when the generation config does not say so.
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    if isinstance(model, (str, os.PathLike)):
        from transformers import GenerationConfig

        try:
            add(GenerationConfig.from_pretrained(os.fspath(model)).eos_token_id)
        except (OSError, ValueError):  # no generation config there: the tokenizer's EOS only
            pass
    elif model is not None:
        add(getattr(getattr(unwrap_model(model), "generation_config", None), "eos_token_id", None))
    if end_of_turn:
        add(_end_of_turn_id(tokenizer))
    return ids


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the chat template's end-of-turn marker, or None (no template, or the marker is not one token)."""
    from ..data.templates import end_of_turn

    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = end_of_turn(tokenizer)
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    return int(ids[0]) if len(ids) == 1 else None


class RolloutEngine(abc.ABC):
    """Prompts in, grouped completions out (see :class:`Rollout`); weights in by :meth:`sync_weights`."""

    #: True when the engine generates with the training model object itself (no IS correction needed).
    samples_from_policy: bool = False
    #: The policy version (optimizer steps) of the weights the engine holds; the trainer sets it on each sync.
    weights_version: int = 0

    def __init__(self, sync_every: int = 1) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every}: expected an integer >= 1")
        self.sync_every = sync_every
        self.sync_count = 0  # weight copies done
        self.last_sync_seconds = 0.0
        self._calls_since_sync = 0

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> Rollout:
        """Sample ``params.n`` completions for each prompt (str, conversation or token ids)."""

    def sync_weights(self, model: nn.Module, force: bool = False) -> bool:
        """Call after every optimizer step: copies ``model``'s weights (PEFT adapters merged) into the engine
        on every ``sync_every``-th call, or now when ``force``. Returns whether a copy happened."""
        if self.samples_from_policy:
            return False
        self._calls_since_sync += 1
        if not force and self._calls_since_sync < self.sync_every:
            return False
        start = time.perf_counter()
        self._push_weights(model)
        self.last_sync_seconds = time.perf_counter() - start
        self.sync_count += 1
        self._calls_since_sync = 0
        return True

    def _push_weights(self, model: nn.Module) -> None:
        """Copy the weights into the engine (backends that are not the policy override this)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load weights")

    def close(self) -> None:
        """Release what the engine holds (processes, memory). Safe to call twice."""

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class OnlineEngineArgs:
    """Rollout-engine fields shared by every online method's config (mix into ``<Method>Config``)."""

    use_vllm: bool = field(default=False, metadata=_help(
        "Generate with vLLM (colocated or a `posttrain serve` server) instead of HF generate."))
    vllm_mode: str = field(default="colocate", metadata=_help(
        "'colocate': vLLM inside the training process; 'server': a `posttrain serve` process at vllm_server_url."))
    vllm_server_url: str = field(default="http://127.0.0.1:8000", metadata=_help(
        "URL of the rollout server (vllm_mode='server')."))
    vllm_server_timeout: float = field(default=600.0, metadata=_help(
        "Seconds to wait for any one reply of the rollout server before failing with RolloutServerError."))
    vllm_gpu_memory_utilization: float | None = field(default=None, metadata=_help(
        "Fraction of GPU memory vLLM may take (on CPU: of host memory). Default 0.3 on GPU, 0.2 on CPU."))
    vllm_sync_every: int = field(default=1, metadata=_help(
        "Copy the trained weights into vLLM after every N optimizer steps."))
    vllm_kv_cache_gb: float | None = field(default=None, metadata=_help(
        "KV-cache size in GiB. Default: 1 on CPU; on GPU derived from vllm_gpu_memory_utilization."))
    vllm_dtype: str = field(default="auto", metadata=_help(
        "vLLM weight dtype: 'auto' (float32 on CPU, the model's dtype on GPU), 'float32', 'bfloat16', 'float16'."))
    vllm_enforce_eager: bool | None = field(default=None, metadata=_help(
        "Disable CUDA graphs / compilation in vLLM. Default: on for CPU, off for GPU."))
    vllm_max_model_len: int | None = field(default=None, metadata=_help(
        "Longest prompt + completion vLLM must hold (default: the model's maximum)."))
    generation_max_batch_size: int = field(default=64, metadata=_help(
        "HF engine: most sequences in one `generate` call (chunks the batch to cap KV-cache memory)."))

    def __post_init__(self) -> None:
        # List this mixin before PostTrainConfig in the bases so this runs, then chains to TrainingArguments.
        self.validate_engine_args()
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()  # type: ignore[misc]

    def validate_engine_args(self) -> None:
        """Raise ValueError naming the field when an engine setting is out of range."""
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode={self.vllm_mode!r}: expected 'colocate' or 'server'")
        if self.vllm_sync_every < 1:
            raise ValueError(f"vllm_sync_every={self.vllm_sync_every}: expected an integer >= 1")
        if self.generation_max_batch_size < 1:
            raise ValueError(f"generation_max_batch_size={self.generation_max_batch_size}: expected >= 1")
        if self.vllm_server_timeout <= 0:
            raise ValueError(f"vllm_server_timeout={self.vllm_server_timeout}: expected seconds > 0")
