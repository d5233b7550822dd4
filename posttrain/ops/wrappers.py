"""The one place that sees through model wrappers: ``torch.compile``, data/model parallel engines and PEFT.

Every layer needs the model under its wrappers: ops/ for the decoder and the output head, the engines
for the weights to generate with or copy, the trainers for the reference model and the checkpoint. They
all use `unwrap_model` and `is_peft_model` here (`posttrain.models` re-exports both).

Duck-typed, with torch as the only import, so ops/ stays free of peft and transformers:
- ``torch.compile``: an ``OptimizedModule`` holds the model in ``_orig_mod``;
- DDP, DataParallel, DeepSpeed engines, FSDP (v1), accelerate's wrappers: the model is ``.module``;
- PEFT: an instance of ``peft.PeftModel`` (checked only when peft has been imported: a PeftModel cannot exist
  otherwise); its ``get_base_model()`` is the transformers model with the adapter layers injected (still
  active in its forward: use `posttrain.models.adapters_disabled` for the base policy).
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["is_peft_model", "unwrap_model"]


def _is_peft(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap_model(model: nn.Module, *, strip_peft: bool = True) -> nn.Module:
    """The model under its ``torch.compile`` and parallel wrappers and, unless ``strip_peft=False``, PEFT.

    With ``strip_peft`` (default) this is the transformers model (for PEFT: the base model with the adapter
    layers injected, so its forward still applies them); without, a PEFT model is returned as the
    ``PeftModel`` (what generates with the adapters, and what `adapters_disabled` switches).
    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif _is_peft(model):
            if not strip_peft:
                break
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DeepSpeed, FSDP, DataParallel
            model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    """True when ``model`` is a ``peft.PeftModel``, also inside compile or parallel wrappers."""
    return _is_peft(unwrap_model(model, strip_peft=False))
