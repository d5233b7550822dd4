"""The shared data pipeline: dataset formats and validation, loading, chat templates, tokenization with loss
masks, packing and collation. See docs/internals.md for the contract."""

from .collators import PaddingCollator, PaddingFreeCollator, packed_attention_mask
from .formats import (
    DatasetFormatError,
    DatasetKind,
    FormatInfo,
    TOKEN_MASK_COLUMNS,
    detect_format,
    parse_tools,
    split_implicit_prompt,
    unpair_preference,
    validate_dataset,
)
from .loading import held_out_split, load_any, load_held_out, split_names
from .packing import pack_bfd, pack_dataset
from .templates import (
    CHAT_TEMPLATES,
    DEFAULT_CHAT_TEMPLATE,
    end_of_turn,
    ensure_chat_template,
    render_chat,
    trainer_tokenizer,
)
from .tokenization import assistant_char_spans, tokenize_messages, tokenize_prompt_completion, tokenize_text

__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_CHAT_TEMPLATE",
    "DatasetFormatError",
    "DatasetKind",
    "FormatInfo",
    "PaddingCollator",
    "PaddingFreeCollator",
    "TOKEN_MASK_COLUMNS",
    "assistant_char_spans",
    "detect_format",
    "end_of_turn",
    "ensure_chat_template",
    "held_out_split",
    "load_any",
    "load_held_out",
    "pack_bfd",
    "pack_dataset",
    "packed_attention_mask",
    "parse_tools",
    "render_chat",
    "split_implicit_prompt",
    "split_names",
    "tokenize_messages",
    "tokenize_prompt_completion",
    "tokenize_text",
    "trainer_tokenizer",
    "unpair_preference",
    "validate_dataset",
]
