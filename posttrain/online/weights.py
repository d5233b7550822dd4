"""The trainer's weights as (checkpoint name, tensor) pairs, for engines that hold their own copy.

:func:`iter_merged_weights` yields the weights of the underlying Hugging Face model under its own
parameter names (``model.layers.0.self_attn.q_proj.weight``), one tensor at a time, in module order. For
a PEFT LoRA model each adapted layer yields ``W + scale * B @ A`` (PEFT's ``get_delta_weight``) computed
for that layer alone, so a sync never deep-copies the model and peak extra memory is one layer's weight;
PEFT's name infixes (``base_model.model.``, ``.base_layer``, ``modules_to_save.<adapter>``) are removed.

For the wire (rollout server), :func:`chunk_weights` packs whole layers into chunks of about
``max_bytes`` (vLLM reloads a layer from one request, so a layer is never split) and
:func:`weights_to_bytes` / :func:`weights_from_bytes` are safetensors blobs: raw little-endian bytes with
a JSON header of names, dtypes and shapes, nothing executable.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from ..ops.wrappers import is_peft_model, unwrap_model

__all__ = ["iter_merged_weights", "chunk_weights",
           "weights_to_bytes", "weights_from_bytes"]

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _merged_lora_weight(layer: nn.Module, weight: Tensor) -> Tensor:
    """``W + sum over active adapters of scale * B @ A`` for one PEFT LoRA layer (a new tensor)."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return weight
    out = weight
    for name in _active_adapters(layer):
        has = name in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_embedding_A", {})
        if not has:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
            raise NotImplementedError(f"adapter {name!r} uses a LoRA variant (e.g. DoRA) whose merged weight is "
                                      "not W + scale * B @ A; syncing it to an engine is not supported")
        out = out + layer.get_delta_weight(name).to(weight.dtype)
    return out


def _modules_to_save_branch(wrapper: nn.Module) -> str:
    """Which branch of a PEFT ``ModulesToSaveWrapper`` its forward runs: an adapter name or 'original_module'."""
    active = _active_adapters(wrapper)
    if getattr(wrapper, "disable_adapters", False) or not active or active[0] not in wrapper.modules_to_save:
        return "original_module"
    return active[0]


def _iter_peft(peft_model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    peft_type = str(getattr(peft_model.peft_config.get(getattr(peft_model, "active_adapter", "default")),
                            "peft_type", "LORA"))
    if "LORA" not in peft_type.upper():
        raise NotImplementedError(f"syncing a {peft_type} PEFT model to an engine is not supported (only LoRA)")
    inner = peft_model.base_model.model
    modules = dict(inner.named_modules())
    for name, param in inner.named_parameters():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if "modules_to_save" in parts or "original_module" in parts:
            key = "modules_to_save" if "modules_to_save" in parts else "original_module"
            i = parts.index(key)
            wrapper = modules[".".join(parts[:i])]
            branch = _modules_to_save_branch(wrapper)
            chosen = parts[i + 1] if key == "modules_to_save" else "original_module"
            if chosen != branch:
                continue
            rest = parts[i + 2:] if key == "modules_to_save" else parts[i + 1:]
            parts = parts[:i] + rest
            name = ".".join(parts)
        tensor = param.detach()
        if "base_layer" in parts:
            i = len(parts) - 1 - parts[::-1].index("base_layer")
            layer = modules[".".join(parts[:i])]
            if parts[i + 1:] == ["weight"] and hasattr(layer, "get_delta_weight"):
                tensor = _merged_lora_weight(layer, tensor)
            name = ".".join(p for p in parts if p != "base_layer")
        yield name, tensor


@torch.no_grad()
def iter_merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for every parameter of the underlying HF model, LoRA adapters merged.

    Tied parameters appear once (under their first name, as ``named_parameters`` lists them). The tensors
    are the live parameters (detached) except merged LoRA weights, which are fresh per-layer tensors.
    Under DeepSpeed ZeRO-3 / FSDP the parameters must be gathered first (not handled here).
    """
    model = unwrap_model(model, strip_peft=False)
    if is_peft_model(model):
        yield from _iter_peft(model)
        return
    for name, param in model.named_parameters():
        yield name, param.detach()


def _group_key(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def chunk_weights(pairs: Iterable[tuple[str, Tensor]], max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Group consecutive weights into chunks of about ``max_bytes``, never splitting a decoder layer
    (``...layers.N.``) or a module across chunks (a chunk may exceed ``max_bytes`` by one layer)."""
    chunk: list[tuple[str, Tensor]] = []
    size = 0
    current_key: str | None = None
    for name, tensor in pairs:
        key = _group_key(name)
        if chunk and key != current_key and size >= max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        current_key = key
    if chunk:
        yield chunk


def weights_to_bytes(pairs: Iterable[tuple[str, Tensor]]) -> bytes:
    """A safetensors blob of the tensors (moved to CPU, contiguous)."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for name, tensor in pairs:
        if name in tensors:
            raise ValueError(f"weight {name!r} appears twice")
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return save(tensors)


def weights_from_bytes(data: bytes) -> dict[str, Tensor]:
    """Parse a safetensors blob (safe: a JSON header and raw tensor bytes, never pickle)."""
    from safetensors.torch import load

    return load(data)
