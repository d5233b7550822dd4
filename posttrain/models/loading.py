"""Load a model or tokenizer from `tiny:<spec>`, a local folder or a hub name.

One entry point for every trainer and the CLI, so that dtype defaults (float32 on CPU, bf16 on a GPU
that supports it), task heads and error messages are the same everywhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .pretrained import pretrained_folder
from .tiny import _tokenizer_vocab, build_tiny, tiny_config
from .tokenizer import build_tokenizer
from .vlm import build_tiny_vlm, is_vlm_spec, tiny_vlm_processor

__all__ = ["TASKS", "default_dtype", "load_model", "load_processing_class", "load_tokenizer", "resolve_dtype"]

TASKS = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "token-cls": AutoModelForTokenClassification,
}
_TINY_HEADS = {"seq-cls": LlamaForSequenceClassification, "token-cls": LlamaForTokenClassification}
# Loading options that only mean something for hub/folder checkpoints; ignored for tiny specs.
_HUB_ONLY = {"revision", "trust_remote_code", "device_map", "low_cpu_mem_usage", "local_files_only",
             "cache_dir", "token", "subfolder", "use_safetensors"}
_OFFLINE_HINT = "For offline use, try a built-in model such as 'tiny:small' (or 'tiny:nano')."


def default_dtype() -> torch.dtype:
    """bfloat16 when a CUDA GPU supports it, else float32 (CPU training is float32)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map None -> `default_dtype()`, "auto" -> "auto", "bfloat16"/"bf16"/torch dtypes -> a torch dtype."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a string, a torch.dtype or None, got {type(dtype).__name__}")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")
    return value


def _quantization_config(model_kwargs: dict[str, Any]) -> None:
    """Turn `load_in_4bit=True` / `load_in_8bit=True` into a bitsandbytes `quantization_config` (QLoRA)."""
    four, eight = model_kwargs.pop("load_in_4bit", False), model_kwargs.pop("load_in_8bit", False)
    if not (four or eight):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(
            "load_in_4bit/load_in_8bit (QLoRA) needs the bitsandbytes package and a CUDA GPU: "
            "pip install bitsandbytes, or drop the option to train in full precision"
        ) from None
    from transformers import BitsAndBytesConfig

    if four:
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)


def _load_tiny(spec: str, dtype: Any, task: str, num_labels: int, model_kwargs: dict[str, Any]) -> PreTrainedModel:
    seed = int(model_kwargs.pop("seed", 0))
    if "quantization_config" in model_kwargs:  # quantize through a temporary checkpoint
        model = _load_tiny(spec, None, task, num_labels, {"seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            extra = {} if task == "causal-lm" else {"num_labels": num_labels}
            return TASKS[task].from_pretrained(tmp, dtype=dtype, **extra, **model_kwargs)
    if is_vlm_spec(spec):
        if task != "causal-lm":
            raise ValueError(f"tiny:{spec} is a vision-language model: task must be 'causal-lm', got {task!r}")
        model, _ = build_tiny_vlm(spec, seed=seed)
    elif task == "causal-lm":
        model, _ = build_tiny(spec, seed=seed)
    else:
        tokenizer = build_tokenizer(_tokenizer_vocab(spec))
        config = tiny_config(spec, tokenizer)
        config.num_labels = num_labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _TINY_HEADS[task](config)
    for key, value in model_kwargs.items():
        if key in _HUB_ONLY:
            continue
        if key == "attn_implementation":
            model.set_attn_implementation(value)
        elif hasattr(model.config, key):
            setattr(model.config, key, value)
        else:
            raise TypeError(f"load_model('tiny:{spec}'): unexpected option {key!r}")
    if dtype is not None and dtype != "auto":
        model = model.to(dtype)
    return model


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split()).rstrip(".")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith((".bin", ".safetensors")) \
        or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_model(
    model: str | os.PathLike | PreTrainedModel,
    *,
    dtype: str | torch.dtype | None = None,
    task: str = "causal-lm",
    num_labels: int = 1,
    **model_kwargs: Any,
) -> PreTrainedModel:
    """Return a model ready to train.

    - a model object (a `PreTrainedModel`, a PEFT model, ...) is returned as is;
    - `"tiny:<spec>"` builds a seeded tiny Llama (`seed=` in `model_kwargs`, default 0) with a causal-LM,
      sequence-classification or token-classification head;
    - a local folder or a hub name loads through the transformers Auto class for `task`.

    `task` is one of "causal-lm", "seq-cls", "token-cls"; `num_labels` sizes the classification head
    (1 for a scalar reward model). `dtype`: None (float32 on CPU, bf16 on a GPU that supports it),
    "auto" (the checkpoint's dtype), "float32", "bfloat16", or a torch dtype. `load_in_4bit=True`
    loads a bitsandbytes-quantized model for QLoRA. Remaining kwargs go to `from_pretrained`.
    """
    if not isinstance(model, (str, os.PathLike)):
        return model
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    model_kwargs = dict(model_kwargs)
    _quantization_config(model_kwargs)
    resolved = resolve_dtype(dtype)
    name = os.fspath(model)
    if name.startswith("tiny:"):
        return _load_tiny(name[len("tiny:"):], resolved, task, num_labels, model_kwargs)
    name = str(pretrained_folder(name) or name)  # built-in real models (smollm2-135m-instruct), built on first use
    if task != "causal-lm":
        model_kwargs["num_labels"] = num_labels
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
    elif _looks_like_path(name) or local.exists():
        raise FileNotFoundError(
            f"model path {name!r} is not a folder (looked for {local.resolve()}). Pass a folder written by "
            f"save_pretrained, a hub name, or a built-in spec. {_OFFLINE_HINT}"
        )
    auto = TASKS[task]
    if task == "causal-lm" and _is_vlm_checkpoint(name, model_kwargs):
        from transformers import AutoModelForImageTextToText

        auto = AutoModelForImageTextToText
    try:
        loaded = auto.from_pretrained(name, dtype=resolved, **model_kwargs)
    except OSError as err:
        where = "local folder" if local.is_dir() else f"no local folder {local.resolve()}, then the model hub"
        raise OSError(f"could not load model {name!r} (tried: {where}): {_reason(err)}. {_OFFLINE_HINT}") from err
    if task != "causal-lm" and loaded.config.pad_token_id is None:
        _set_pad_from_tokenizer(loaded, name, model_kwargs)
    return loaded


def _is_vlm_checkpoint(name: str, model_kwargs: dict[str, Any]) -> bool:
    """True when the checkpoint's config is a vision-language model's (it has a `vision_config`): it loads
    through `AutoModelForImageTextToText`, whose classes take images. A config that cannot be read is not."""
    from transformers import AutoConfig

    keys = ("revision", "trust_remote_code", "local_files_only", "cache_dir", "token", "subfolder")
    try:
        config = AutoConfig.from_pretrained(name, **{k: v for k, v in model_kwargs.items() if k in keys})
    except (OSError, ValueError):
        return False
    return getattr(config, "vision_config", None) is not None


def load_processing_class(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """The processing class for a model name: a VLM's processor (`tiny:vlm*` or a checkpoint whose config is a
    VLM's, through `AutoProcessor`), else the tokenizer (`load_tokenizer`)."""
    name = os.fspath(name_or_path)
    if name.startswith("tiny:"):
        spec = name[len("tiny:"):]
        return tiny_vlm_processor(spec) if is_vlm_spec(spec) else load_tokenizer(name, **kwargs)
    resolved = str(pretrained_folder(name) or name)
    if _is_vlm_checkpoint(resolved, kwargs):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(resolved, **kwargs)
        except OSError as err:
            raise OSError(f"could not load the processor of {name!r}: {_reason(err)}. {_OFFLINE_HINT}") from err
    return load_tokenizer(name, **kwargs)


def _set_pad_from_tokenizer(model: PreTrainedModel, name: str, model_kwargs: dict[str, Any]) -> None:
    """A classification head finds each row's last token through pad_token_id; take it from the tokenizer."""
    try:
        tokenizer = load_tokenizer(name, local_files_only=model_kwargs.get("local_files_only", False))
    except OSError:
        return
    model.config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer for a model name: `tiny:<spec>` gives the project tokenizer, anything else
    AutoTokenizer. A tokenizer with no pad token gets its eos token as pad."""
    name = os.fspath(name_or_path)
    if name.startswith("tiny:"):
        spec = name[len("tiny:"):]
        if is_vlm_spec(spec):
            return tiny_vlm_processor(spec).tokenizer
        return build_tokenizer(_tokenizer_vocab(spec))
    name = str(pretrained_folder(name) or name)
    local = Path(name).expanduser()
    if not local.is_dir() and (_looks_like_path(name) or local.exists()):
        raise FileNotFoundError(
            f"tokenizer path {name!r} is not a folder (looked for {local.resolve()}). {_OFFLINE_HINT}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name, **kwargs)
    except OSError as err:
        raise OSError(f"could not load tokenizer {name!r} (tried: local folder, then the model hub): "
                      f"{_reason(err)}. {_OFFLINE_HINT}") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
