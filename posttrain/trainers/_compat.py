"""TRL-compatibility plumbing shared by every trainer: the constructor arguments TRL's trainers take beyond the
data (``quantization_config``, ``model_init``), config fields that only mean something on hardware or engines
posttrain does not run (warned about once, never silently ignored), ``disable_dropout``, ``activation_offloading``
and the tokenizer fields (``pad_token``, ``eos_token``, ``chat_template_path``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["warn_inapplicable", "non_default_fields", "disable_dropout_in_model", "quantized_model_kwargs",
           "model_from_init", "apply_token_fields", "read_chat_template_path", "activation_offloading_context"]


def non_default_fields(args: Any, names: Mapping[str, str] | list[str]) -> list[str]:
    """The fields among ``names`` whose value on ``args`` differs from the config class's default."""
    defaults = {}
    for f in dataclasses.fields(args):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return [n for n in names if n in defaults and getattr(args, n, defaults[n]) != defaults[n]]


def warn_inapplicable(args: Any, reasons: Mapping[str, str], owner: str) -> list[str]:
    """Log one warning per field of ``reasons`` that ``args`` sets to a non-default value: the field is accepted
    (code written for TRL runs unchanged) but does nothing here, for the reason given. Returns those fields."""
    fields = non_default_fields(args, reasons)
    for name in fields:
        logger.warning("%s: %s=%r has no effect here: %s", owner, name, getattr(args, name), reasons[name])
    return fields


def disable_dropout_in_model(model: torch.nn.Module) -> int:
    """Set the probability of every dropout module of ``model`` to 0 (TRL's ``disable_dropout``): the policy's
    log-probs are then deterministic, as the reference's are. Returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p = 0.0
            changed += 1
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float) and getattr(config, key):
            setattr(config, key, 0.0)  # models that read the rate from the config at forward time (Llama attention)
            changed += 1
    return changed


def quantized_model_kwargs(quantization_config: Any, model: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for TRL's ``quantization_config`` constructor argument.

    A bitsandbytes config needs the bitsandbytes package (and in practice a CUDA GPU): without it this is a
    clear ImportError before anything loads. A model that is already loaded cannot be quantized here."""
    if quantization_config is None:
        return {}
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError("quantization_config applies when the model is loaded from a name or path; this model is "
                         "already loaded: quantize it when you load it, or pass its name")
    if "BitsAndBytes" in type(quantization_config).__name__ or (
            isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "bitsandbytes"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError("quantization_config is a bitsandbytes config, which needs the bitsandbytes package "
                              "(and a CUDA GPU): pip install bitsandbytes, or drop quantization_config to train "
                              "in full precision") from None
    if os.fspath(model).startswith("tiny:"):
        raise ValueError("quantization_config does not apply to built-in tiny models; pass a model folder or name")
    return {"quantization_config": quantization_config}


def model_from_init(model: Any, model_init: Callable[..., Any] | None) -> Any:
    """TRL's ``model_init``: the model is built by calling it when no ``model`` is given. (The Trainer's
    hyperparameter search, which calls it again per trial, is not supported: a warning says so.)"""
    if model_init is None:
        return model
    if model is not None:
        raise ValueError("pass either model or model_init, not both")
    logger.warning("model_init builds the model once at construction; hyperparameter_search's re-initialization "
                   "per trial is not supported")
    return model_init()


def read_chat_template_path(path: str | None) -> str | None:
    """The chat template a ``chat_template_path`` names: a Jinja file's text, or the template of the tokenizer
    saved in a folder (its ``chat_template.jinja`` or ``tokenizer_config.json``)."""
    if path is None:
        return None
    if os.path.isdir(path):
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja):
            return open(jinja, encoding="utf-8").read()
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(path).chat_template
        if not template:
            raise ValueError(f"chat_template_path={path!r}: the tokenizer in that folder has no chat template")
        return template
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat_template_path={path!r} is neither a Jinja file nor a tokenizer folder")
    return open(path, encoding="utf-8").read()


def apply_token_fields(tokenizer: Any, pad_token: str | None, eos_token: str | None) -> None:
    """Set TRL's ``pad_token`` / ``eos_token`` on the trainer's own tokenizer copy; each must be a token of the
    vocabulary (an unknown one would silently become the unknown token)."""
    for name, token in (("pad_token", pad_token), ("eos_token", eos_token)):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"{name}={token!r} is not a token of the tokenizer's vocabulary")
        setattr(tokenizer, name, token)


def activation_offloading_context(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """TRL's ``activation_offloading``: the activations autograd saves for the backward pass live in host memory
    (pinned) between the forward and the backward, trading transfer time for accelerator memory. On a CPU there
    is nothing to offload to, so it is a no-op (the trainer warns once)."""
    if not enabled or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


# Types of the constructor parameters every trainer names explicitly, in TRL's spelling (for help() and IDEs).
ModelArg = Any  # a model object, a name or path, or "tiny:<spec>"
CollatorArg = Callable[[list[Any]], dict[str, Any]] | None
DatasetArg = Any  # datasets.Dataset / IterableDataset / DatasetDict, a list of rows, a folder or file, or None
EvalDatasetArg = Any  # as DatasetArg, or a dict name -> dataset (evaluated separately)
ProcessingClassArg = Any  # a tokenizer or processor (PreTrainedTokenizerBase | ProcessorMixin), or None
MetricsFn = Callable[[Any], dict] | None  # compute_metrics(EvalPrediction) -> dict
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # preprocess_logits_for_metrics
CallbacksArg = list | None  # list[transformers.TrainerCallback]
OptimizersArg = tuple  # (torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None)
OptimizerClsArg = tuple[type, dict[str, Any]] | None  # (optimizer class, its keyword arguments)
QuantizationArg = Any  # a transformers quantization config (e.g. BitsAndBytesConfig), or None
PeftConfigArg = Any  # a peft.PeftConfig, or None
ModelInitArg = Callable[[], Any] | None
