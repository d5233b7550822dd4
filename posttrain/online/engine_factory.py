"""Which rollout engine a config asks for, built: `make_engine`.

Kept apart from `posttrain.online.engines` (the interface every backend implements and imports) so the
interface never imports a backend: each backend is imported here only when a config selects it, so a
process that trains on the HF engine never loads vLLM or the rollout-server client.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .engines import OnlineEngineArgs, RolloutEngine, default_stop_token_ids

__all__ = ["make_engine"]


def make_engine(args: Any, model: nn.Module, tokenizer: Any) -> RolloutEngine:
    """The engine the config asks for: HF generate unless ``use_vllm``; then colocated vLLM or the server client.

    ``args`` is any object with the :class:`OnlineEngineArgs` fields (missing ones take their defaults).
    The vLLM engine and the server client get the model's current weights at creation.
    """
    defaults = OnlineEngineArgs()

    def get(name: str) -> Any:
        return getattr(args, name, getattr(defaults, name))

    if not get("use_vllm"):
        from .engine_hf import HFEngine
        return HFEngine(model, tokenizer, max_batch_size=get("generation_max_batch_size"))
    mode = get("vllm_mode")
    if mode == "colocate":
        from .engine_vllm import VLLMEngine
        return VLLMEngine(model, tokenizer, gpu_memory_utilization=get("vllm_gpu_memory_utilization"),
                          kv_cache_gb=get("vllm_kv_cache_gb"), dtype=get("vllm_dtype"),
                          enforce_eager=get("vllm_enforce_eager"), max_model_len=get("vllm_max_model_len"),
                          sync_every=get("vllm_sync_every"), seed=getattr(args, "seed", 0))
    if mode == "server":
        from .client import RolloutServerClient
        client = RolloutServerClient(get("vllm_server_url"), tokenizer, timeout=get("vllm_server_timeout"),
                                     sync_every=get("vllm_sync_every"),
                                     stop_token_ids=default_stop_token_ids(tokenizer, model))
        client.sync_weights(model, force=True)
        return client
    raise ValueError(f"vllm_mode={mode!r}: expected 'colocate' or 'server'")
