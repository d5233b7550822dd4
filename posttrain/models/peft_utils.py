"""PEFT (LoRA / QLoRA) helpers.

Named `peft_utils` so it never shadows the `peft` package. Wrapper stripping (`unwrap_model`, `is_peft_model`)
lives in `posttrain.ops.wrappers` and is re-exported here. Under PEFT the frozen base model is the
reference policy: `adapters_disabled(model)` runs it without a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Mapping

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from ..ops.wrappers import is_peft_model, unwrap_model

__all__ = ["adapters_disabled", "apply_peft", "is_peft_model", "merge_and_unload", "unwrap_model"]

# Keys of a dict config that ask for a quantized (QLoRA) base model rather than configure LoRA.
_QUANT_KEYS = ("load_in_4bit", "load_in_8bit", "qlora")


def _task_type(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def _is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "quantization_method", None))


def apply_peft(
    model: torch.nn.Module,
    peft_config: PeftConfig | Mapping[str, Any],
    *,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap `model` with adapters from `peft_config` (a `peft.PeftConfig` or a dict of `LoraConfig` fields).

    A dict defaults to `target_modules="all-linear"` and a task type that matches the model's head.
    A dict key (or config attribute) `load_in_4bit`/`load_in_8bit`/`qlora` set asks for QLoRA: the model must already be
    quantized (`load_model(..., load_in_4bit=True)`, which needs bitsandbytes), else a clear error.
    Only adapter (and, for classification, head) parameters stay trainable.
    """
    if is_peft_model(model):
        raise ValueError("model already has PEFT adapters; pass the base model to apply_peft")
    base = unwrap_model(model, strip_peft=False)
    wants_kbit = False
    if isinstance(peft_config, Mapping):
        fields = dict(peft_config)
        wants_kbit = any(bool(fields.pop(k, False)) for k in _QUANT_KEYS)
        fields.setdefault("target_modules", "all-linear")
        fields.setdefault("task_type", _task_type(base))
        if fields.get("task_type") == "SEQ_CLS":
            fields.setdefault("modules_to_save", ["score"])
        peft_type = str(fields.pop("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ValueError(f"a dict peft_config builds a LoraConfig; for peft_type={peft_type!r} "
                             "pass a peft config object")
        try:
            config: PeftConfig = LoraConfig(**fields)
        except TypeError as err:
            raise TypeError(f"bad LoRA option in peft_config: {err}") from None
    elif isinstance(peft_config, PeftConfig):
        config = peft_config
        # a config object may carry the QLoRA request as an extra attribute (`config.load_in_4bit = True`)
        wants_kbit = any(bool(getattr(config, k, False)) for k in _QUANT_KEYS)
    else:
        raise TypeError(f"peft_config must be a peft.PeftConfig or a dict, got {type(peft_config).__name__}")

    if wants_kbit or _is_quantized(base):
        if not _is_quantized(base):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ImportError("QLoRA (4-bit) needs the bitsandbytes package and a CUDA GPU: pip install "
                                  "bitsandbytes, or drop load_in_4bit to train LoRA in full precision") from None
            raise ValueError("QLoRA asked for, but the model is not quantized: load it with "
                             "load_model(name, load_in_4bit=True) before apply_peft")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing and hasattr(base, "enable_input_require_grads"):
        # checkpointed blocks need a grad-requiring input even though the embeddings are frozen
        base.enable_input_require_grads()
    _language_model_only(base, config)
    return get_peft_model(base, config)


def _language_model_only(model: torch.nn.Module, config: PeftConfig) -> None:
    """On a vision-language model, adapters go on the language model only (TRL's VLM recipes do the same): a
    `target_modules` given as names or "all-linear" becomes a regex over the language model's modules of those
    names (its linear layers, for "all-linear"; never the output head). A regex string is the user's own and
    is kept."""
    from .vlm import is_vlm, language_model_prefix

    targets = getattr(config, "target_modules", None)
    if not is_vlm(model) or targets is None or (isinstance(targets, str) and targets != "all-linear"):
        return
    prefix = language_model_prefix(model)
    if targets == "all-linear":
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n.startswith(prefix + ".") and isinstance(m, torch.nn.Linear)})
    else:
        names = sorted(set(targets))
    if not names:
        return
    config.target_modules = rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(n) for n in names)})"


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context in which a PEFT model computes with its adapters off: the frozen base = the reference policy.

    Raises for a model without adapters, since silently running the policy as its own reference would
    make every KL term zero.
    """
    inner = unwrap_model(model, strip_peft=False)
    if not isinstance(inner, PeftModel):
        raise ValueError(f"adapters_disabled needs a PEFT model, got {type(inner).__name__}; "
                         "without adapters keep a separate reference model instead")
    with inner.disable_adapter():
        yield model


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA weights into the base weights and return the plain transformers model (no-op without PEFT)."""
    inner = unwrap_model(model, strip_peft=False)
    if isinstance(inner, PeftModel):
        return inner.merge_and_unload()
    return inner
