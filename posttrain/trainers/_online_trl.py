"""TRL 1.16's GRPOConfig / RLOOConfig fields that posttrain's online config did not have, and what they do here.

Behaviour fields (`OnlineTRLFields`, applied by `OnlineTRLMixin`): ``generation_kwargs`` (sampling settings
merged over the config's; ``chat_template_kwargs`` is `OnlineConfig`'s own),
``shuffle_dataset`` (the prompt order of each epoch), ``disable_dropout``, ``sync_ref_model`` (TR-DPO: the
reference moves toward the policy every ``ref_model_sync_steps``), ``pad_to_multiple_of`` (warned about: rollout
batches are not rounded) and
``num_generations_eval`` (completions per prompt at evaluation). ``vllm_server_host`` / ``vllm_server_port``
make the server URL when ``vllm_server_base_url`` is not given.

Fields that only mean something on engines or hardware posttrain does not run (DeepSpeed-3 gathering, vLLM
tensor parallelism and sleep mode, transformers' paged attention / continuous batching, structured outputs, hub
logging of completions, multimodal tables) are accepted, documented in their help, and warned about once when
set to a non-default value (`OnlineTRLMixin.inapplicable_fields`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..online.engines import SamplingParams
from ._reference import SyncRefModelCallback
from ._trl_fields import PAD_TO_MULTIPLE_HELP, resolve_pad_to_multiple_of

logger = logging.getLogger(__name__)

__all__ = ["OnlineTRLFields", "OnlineTRLMixin", "ONLINE_INAPPLICABLE", "warn_pad_to_multiple_of"]

_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens",
                  "max_tokens": "max_new_tokens", "seed": "seed", "stop_token_ids": "stop_token_ids"}

ONLINE_INAPPLICABLE = {
    "ds3_gather_for_generation": "weights are synced to the rollout engine by the engine (no DeepSpeed-3 gather "
                                 "step to turn off)",
    "cache_implementation": "the HF engine uses the model's default KV cache",
    "vllm_model_impl": "posttrain's vLLM engine loads vLLM's own model implementation",
    "vllm_enable_sleep_mode": "the colocated vLLM engine is not put to sleep between generations",
    "vllm_structured_outputs_regex": "structured (regex-guided) decoding is not wired into the rollout engines",
    "vllm_group_port": "weights reach the rollout server over HTTP, not an NCCL group",
    "vllm_tensor_parallel_size": "the colocated vLLM engine runs on one device per process",
    "use_transformers_continuous_batching": "the HF engine batches whole generations (no continuous batching)",
    "transformers_continuous_batching_config": "the HF engine batches whole generations (no continuous batching)",
    "use_transformers_paged": "the HF engine does not use paged attention",
    "log_multimodal": "posttrain's online trainers take text prompts only",
    "log_completions_hub_repo": "completions are logged through report_to and to the output folder, not pushed "
                                "to a hub dataset",
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class OnlineTRLFields:
    """GRPOConfig / RLOOConfig fields of TRL 1.16 shared by both (see the module docstring)."""

    disable_dropout: bool = field(default=False, metadata=_help(
        "Set every dropout probability of the policy to 0 (deterministic log-probs)."))
    shuffle_dataset: bool = field(default=True, metadata=_help(
        "Shuffle the prompts each epoch (seeded); False keeps the dataset's order."))
    pad_to_multiple_of: int | str | None = field(default="auto", metadata=_help(PAD_TO_MULTIPLE_HELP))
    generation_kwargs: dict | str | None = field(default=None, metadata=_help(
        "Sampling settings that override the config's for the rollouts: temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens (or max_tokens), seed, stop_token_ids. Other keys are an error."))
    num_generations_eval: int | None = field(default=None, metadata=_help(
        "Completions per prompt at evaluation (None: num_generations). A divisor of per_device_eval_batch_size."))
    sync_ref_model: bool = field(default=False, metadata=_help(
        "TR-DPO (Gorbatovski et al. 2024): every ref_model_sync_steps, ref <- alpha * policy + (1 - alpha) * ref. "
        "Needs beta != 0 and a reference model (not a PEFT policy's base)."))
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("TR-DPO mixing weight of the policy."))
    ref_model_sync_steps: int = field(default=512, metadata=_help("TR-DPO: sync the reference every N steps."))
    log_unique_prompts: bool = field(default=False, metadata=_help(
        "In the completions table, show each prompt once (its first completion) instead of every completion."))
    # accepted for TRL compatibility; warned when set (see ONLINE_INAPPLICABLE)
    ds3_gather_for_generation: bool = field(default=True, metadata=_help(
        "DeepSpeed ZeRO-3 gathering for generation (TRL). No effect here: the engine syncs weights itself."))
    cache_implementation: str | None = field(default=None, metadata=_help("KV cache implementation (TRL). No effect."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation (TRL). Only 'vllm'."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("vLLM sleep mode (TRL). Not supported."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help(
        "Regex-guided decoding (TRL). Not supported: warned when set."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help(
        "Rollout server host; with vllm_server_port it makes the URL when vllm_server_base_url is not set."))
    vllm_server_port: int = field(default=8000, metadata=_help("Rollout server port (see vllm_server_host)."))
    vllm_group_port: int = field(default=51216, metadata=_help("NCCL group port (TRL). Not used: weights go over HTTP."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help(
        "Context length of the vLLM engine (TRL's name for vllm_max_model_len)."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("vLLM tensor parallelism (TRL). Only 1."))
    use_transformers_continuous_batching: bool = field(default=False, metadata=_help(
        "transformers continuous batching for generation (TRL). Not supported: warned when set."))
    transformers_continuous_batching_config: dict | None = field(default=None, metadata=_help(
        "Its configuration (TRL). Not supported."))
    use_transformers_paged: bool = field(default=False, metadata=_help("transformers paged attention (TRL). No effect."))
    log_multimodal: bool = field(default=True, metadata=_help("Log images in the completions table (TRL). Text only here."))

    def _resolve_online_trl_fields(self) -> None:
        """Parse the JSON-string forms the command line gives and map TRL's aliases onto posttrain's fields."""
        import json

        for name in ("generation_kwargs",):  # chat_template_kwargs: OnlineConfig
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name} must be a JSON object, got {value!r}: {err}") from None
        unknown = sorted(set(self.generation_kwargs or {}) - set(_SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"generation_kwargs: unsupported keys {unknown}; supported: {sorted(_SAMPLING_KEYS)}")
        self.pad_to_multiple_of = resolve_pad_to_multiple_of(self.pad_to_multiple_of)
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ValueError(f"num_generations_eval={self.num_generations_eval}: expected >= 1")
        if self.vllm_max_model_length is not None and getattr(self, "vllm_max_model_len", None) is None:
            self.vllm_max_model_len = self.vllm_max_model_length
        explicit_host = (self.vllm_server_host, self.vllm_server_port) != ("0.0.0.0", 8000)
        if explicit_host and getattr(self, "vllm_server_base_url", None) is None:
            host = "127.0.0.1" if self.vllm_server_host == "0.0.0.0" else self.vllm_server_host
            self.vllm_server_url = f"http://{host}:{self.vllm_server_port}"
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0 or self.ref_model_sync_steps < 1:
            raise ValueError("ref_model_mixup_alpha must be in [0, 1] and ref_model_sync_steps >= 1")


def warn_pad_to_multiple_of(owner: str, value: int | None) -> None:
    """Warn (once, at construction) that a ``pad_to_multiple_of`` number does nothing in an online trainer;
    'auto' resolves to None and stays quiet."""
    if value is not None:
        logger.warning("%s: pad_to_multiple_of=%d has no effect here: rollout batches are padded to their longest "
                       "sequence (rounding is a speed setting for accelerators; results would not change)",
                       owner, value)


class OnlineTRLMixin:
    """Applies `OnlineTRLFields` in an online trainer (mixed in before `OnlineTrainer`)."""

    inapplicable_fields: ClassVar[dict[str, str]] = dict(ONLINE_INAPPLICABLE)

    def _setup_online_trl(self) -> None:
        args = self.args
        warn_pad_to_multiple_of(type(self).__name__, args.pad_to_multiple_of)
        if args.sync_ref_model:
            if self.ref_model is None:
                raise ValueError("sync_ref_model needs a separate reference model: set beta != 0, and with a PEFT "
                                 "policy (whose reference is its own base) drop sync_ref_model")
            self.add_callback(SyncRefModelCallback(self.ref_model, args.ref_model_mixup_alpha,
                                                   args.ref_model_sync_steps))

    def sampling_params(self, mode: str = "train", round_: int | None = None, refill: int = 0) -> SamplingParams:
        params = super().sampling_params(mode, round_, refill)
        extra = self.args.generation_kwargs
        if not extra:
            return params
        return dataclasses.replace(params, **{_SAMPLING_KEYS[k]: v for k, v in extra.items()})
