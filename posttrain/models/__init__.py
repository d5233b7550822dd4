"""Models: the project tokenizer, tiny seeded Llama models, loading by name/path/spec, and PEFT helpers."""

from .loading import default_dtype, load_model, load_tokenizer, resolve_dtype
from .peft_utils import adapters_disabled, apply_peft, is_peft_model, merge_and_unload, unwrap_model
from .tiny import TINY_SIZES, build_tiny, parse_tiny_spec, tiny_config
from .tokenizer import CHATML_TEMPLATE, build_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "TINY_SIZES",
    "adapters_disabled",
    "apply_peft",
    "build_tiny",
    "build_tokenizer",
    "default_dtype",
    "is_peft_model",
    "load_model",
    "load_tokenizer",
    "merge_and_unload",
    "parse_tiny_spec",
    "resolve_dtype",
    "tiny_config",
    "unwrap_model",
]
