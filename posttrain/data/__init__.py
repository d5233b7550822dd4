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
    unpair_row,
    validate_dataset,
    validate_row,
)
from .loading import held_out_split, load_any, load_held_out, split_names
from .mixtures import DatasetSource, MixtureReport, mix_datasets, mix_with_report
from .packing import pack_bfd, pack_dataset, pack_rows
from .streaming import StreamPrompts, TokenizedStream, is_stream, stream_format
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
    "DatasetSource",
    "FormatInfo",
    "MixtureReport",
    "PaddingCollator",
    "PaddingFreeCollator",
    "StreamPrompts",
    "TOKEN_MASK_COLUMNS",
    "TokenizedStream",
    "assistant_char_spans",
    "detect_format",
    "end_of_turn",
    "ensure_chat_template",
    "held_out_split",
    "is_stream",
    "load_any",
    "load_held_out",
    "mix_datasets",
    "mix_with_report",
    "pack_bfd",
    "pack_dataset",
    "pack_rows",
    "packed_attention_mask",
    "parse_tools",
    "render_chat",
    "split_implicit_prompt",
    "split_names",
    "stream_format",
    "tokenize_messages",
    "tokenize_prompt_completion",
    "tokenize_text",
    "trainer_tokenizer",
    "unpair_preference",
    "unpair_row",
    "validate_dataset",
    "validate_row",
]
