"""Models: the project tokenizer, tiny seeded Llama models, loading by name/path/spec, and PEFT helpers."""

from .loading import default_dtype, load_model, load_processing_class, load_tokenizer, resolve_dtype
from .peft_utils import adapters_disabled, apply_peft, is_peft_model, merge_and_unload, unwrap_model
from .tiny import TINY_SIZES, build_tiny, parse_tiny_spec, tiny_config
from .tokenizer import CHATML_TEMPLATE, build_tokenizer
from .vlm import TINY_VLMS, build_tiny_vlm, freeze_vision, is_vlm, save_tiny_vlm, uses_mrope

__all__ = [
    "CHATML_TEMPLATE",
    "TINY_SIZES",
    "TINY_VLMS",
    "adapters_disabled",
    "apply_peft",
    "build_tiny",
    "build_tiny_vlm",
    "build_tokenizer",
    "default_dtype",
    "freeze_vision",
    "is_peft_model",
    "is_vlm",
    "load_model",
    "load_processing_class",
    "load_tokenizer",
    "merge_and_unload",
    "parse_tiny_spec",
    "resolve_dtype",
    "save_tiny_vlm",
    "tiny_config",
    "unwrap_model",
    "uses_mrope",
]
