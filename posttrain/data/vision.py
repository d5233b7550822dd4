"""Images through the data pipeline: TRL's vision data shape, its validation, tokenization with exact loss masks
through a model's processor, and collation of the image tensors.

Data shape (as TRL's): an `images` column (a list of images per row) or `image` (one), and conversational rows
whose `content` is a list of parts, `{"type": "image"}` or `{"type": "text", "text": ...}`; the k-th image part
of a row is the row's k-th image. An image is a PIL image, a file path, or what a `datasets.Image` feature
holds (`{"bytes", "path"}`). Plain-string content keeps working beside parts.

Loss masks stay exact on the expanded sequence: the conversation is rendered to text with one placeholder per
image part (the processor's image token, e.g. `<image>`), assistant spans are found on that text by
`tokenization.assistant_char_spans` (any prefix-consistent template), the processor then expands each
placeholder into the model's image tokens, and the mask is carried over token by token: the text tokens of
the expanded sequence are the text tokens of the unexpanded one, in order (checked), and every multimodal token
(image tokens and the markers around them) is out of the loss. Pixel tensors are not stored in the tokenized
dataset: the images are, and `VisionCollator` runs the image processor per batch (whatever it returns:
`pixel_values`, `image_sizes`, `image_grid_thw`, `pixel_attention_mask`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

from .images import (IMAGE_COLUMNS, PART_TYPES, count_image_parts, image_column, is_processor, load_image,  # noqa: F401
                     row_images, validate_images)
from .templates import render_chat
from .tokenization import _mask_from_spans, assistant_char_spans

__all__ = ["IMAGE_COLUMNS", "PART_TYPES", "VisionCollator", "attach_images", "count_image_parts", "flatten_parts", "image_column",
           "image_placeholder", "is_processor", "load_image", "multimodal_token_ids", "row_images",
           "tokenize_vision_messages", "validate_images", "vision_inputs"]

def flatten_parts(messages: list[dict[str, Any]], placeholder: str) -> list[dict[str, Any]]:
    """The conversation with every list-of-parts `content` joined into a string: text parts as they are, image
    parts as `placeholder` (the processor expands it later). String content is kept."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text = "".join(placeholder if p.get("type") == "image" else (p.get("text") or "") for p in content)
            message = {**message, "content": text}
        out.append(message)
    return out


def image_placeholder(processor: Any) -> str:
    """The text that stands for one image before the processor expands it (Qwen2-VL style processors wrap
    their image token in vision start/end markers)."""
    token = getattr(processor, "image_token", None) or "<image>"
    start, end = getattr(processor, "vision_start_token", None), getattr(processor, "vision_end_token", None)
    vocab = processor.tokenizer.get_vocab()
    if not (start and end) and token == "<|image_pad|>" and "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        start, end = "<|vision_start|>", "<|vision_end|>"  # Qwen2-VL's processors keep them in the template only
    if start and end:
        return f"{start}{token}{end}"
    return token


_MM_ID_ATTRS = ("image_token_id", "fake_image_token_id", "global_image_token_id", "vision_start_token_id",
                "vision_end_token_id", "boi_token_id", "eoi_token_id", "image_start_token_id", "image_end_token_id",
                "video_token_id")


_MM_TOKEN_ATTRS = ("image_token", "fake_image_token", "global_image_tag", "vision_start_token", "vision_end_token",
                   "boi_token", "eoi_token", "image_start_token", "image_end_token", "video_token")


def multimodal_token_ids(processor: Any) -> set[int]:
    """Ids of every token the processor writes for an image (image tokens, markers, row/column tags): never in
    the loss."""
    tokenizer = processor.tokenizer
    ids: set[int] = set()
    for attr in _MM_ID_ATTRS:
        value = getattr(processor, attr, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    ids.update(i for i in (getattr(processor, "row_col_ids", None) or []) if isinstance(i, int))
    vocab = tokenizer.get_vocab()
    ids.update(tokenizer(image_placeholder(processor), add_special_tokens=False)["input_ids"])
    for attr in _MM_TOKEN_ATTRS:  # the strings too: a processor may read an id before its tokens were added
        token = getattr(processor, attr, None)
        if isinstance(token, str) and token in vocab:
            ids.add(vocab[token])
    return ids


def _expand_mask(unexpanded: list[int], mask: list[int], expanded: list[int], special: set[int]) -> list[int]:
    """Carry `mask` (over `unexpanded`) onto `expanded`: text tokens in order, multimodal tokens 0."""
    text_mask = [m for t, m in zip(unexpanded, mask) if t not in special]
    text_u = [t for t in unexpanded if t not in special]
    text_e = [t for t in expanded if t not in special]
    if text_u != text_e:
        raise ValueError("the processor changed the text tokens while expanding the image tokens; cannot carry the "
                         "loss mask over (its tokenizer must split at its image tokens)")
    it = iter(text_mask)
    return [0 if t in special else next(it) for t in expanded]


def tokenize_vision_messages(
    processor: Any,
    messages: list[dict[str, Any]],
    images: list[Any],
    tools: list[dict] | None = None,
    *,
    prompt_messages: int | None = None,
) -> dict[str, Any]:
    """Tokenize a conversation with images through `processor`: `{"input_ids", "assistant_mask", "image_mask"}`
    over the expanded sequence (image tokens in place), the rendering made with the processor tokenizer's chat
    template. `assistant_mask` is 1 on assistant content and end-of-turn markers (never image tokens);
    `image_mask` 1 on multimodal tokens. With `prompt_messages=n`, the first n messages are the prompt and
    `assistant_mask` covers everything rendered after the prompt's generation prompt (completion-only loss).
    """
    tokenizer = processor.tokenizer
    placeholder = image_placeholder(processor)
    flat = flatten_parts(messages, placeholder)
    text = render_chat(tokenizer, flat, tools=tools)
    if prompt_messages is None:
        spans = assistant_char_spans(tokenizer, flat, text, tools)
    else:
        prompt_text = render_chat(tokenizer, flat[:prompt_messages], add_generation_prompt=True, tools=tools)
        if not text.startswith(prompt_text):
            raise ValueError("the chat template does not render prefix-consistently: the prompt rendered with "
                             "add_generation_prompt=True is not a prefix of prompt + completion")
        spans = [(len(prompt_text), len(text.rstrip()))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask_u = _mask_from_spans([tuple(o) for o in enc["offset_mapping"]], spans)
    special = multimodal_token_ids(processor)
    loaded = [load_image(im) for im in images]
    processed = processor(text=[text], images=_processor_images(processor, [loaded]) if loaded else None,
                          add_special_tokens=False)
    expanded = list(processed["input_ids"][0])
    mask = _expand_mask(list(enc["input_ids"]), mask_u, expanded, special)
    out = {"input_ids": expanded, "assistant_mask": mask, "image_mask": [int(t in special) for t in expanded]}
    if "mm_token_type_ids" in processed:  # M-RoPE models (Qwen2-VL) place image tokens by it
        out["mm_token_type_ids"] = [int(v) for v in processed["mm_token_type_ids"][0]]
    if prompt_messages is not None:  # the completion's end: drop what the template adds after its last turn
        last = max((t for t, m in enumerate(mask) if m), default=-1)
        if last >= 0:
            out = {k: (v[: last + 1] if isinstance(v, list) else v) for k, v in out.items()}
    return out


def _nested(processor: Any) -> bool:
    """Idefics3/SmolVLM style image processors take one list of images per text row; the others a flat list."""
    return type(processor.image_processor).__name__.startswith(("Idefics", "SmolVLM"))


def _processor_images(processor: Any, per_row: list[list[Any]]) -> Any:
    if _nested(processor):
        return per_row
    return [im for row in per_row for im in row]


def attach_images(tokenized: Any, source: Any, column: str) -> Any:
    """`tokenized` (row i made from `source` row i) with `source`'s images as an `images` column typed
    `Sequence(Image())`. Why not let tokenization return them: Arrow infers a column's type from the first
    write batch, and a batch whose rows all have no image types it `list<null>`, which later images cannot be
    cast to."""
    import datasets

    features = datasets.Features({"images": datasets.Sequence(datasets.Image())})
    images = source.select_columns([column]).map(lambda row: {"images": row_images(row)}, remove_columns=[column],
                                                 features=features, desc="Keeping the images")
    return datasets.concatenate_datasets([tokenized, images], axis=1)


def vision_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The image tensors of a batch (what the image processor returned) and the per-token `mm_token_type_ids`
    some processors return, to pass on to the model's forward."""
    return {k: v for k, v in batch.items()
            if k.startswith(("pixel_", "image_")) and k != "image_mask" or k == "mm_token_type_ids"}


class VisionCollator:
    """A text collator plus the images: each row's `images` (kept by tokenization) go through the image processor
    once per batch, and everything it returns joins the batch (`pixel_values`, `image_grid_thw`, `image_sizes`,
    `pixel_attention_mask`, ...). Rows with no image add none; a batch with no image has no pixel tensors."""

    def __init__(self, processor: Any, text_collator: Callable[[list[Any]], dict[str, Any]]):
        self.processor = processor
        self.text_collator = text_collator

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        per_row = [[load_image(im) for im in (r.get("images") or [])] for r in rows]
        batch = self.text_collator([{k: v for k, v in r.items() if k != "images"} for r in rows])
        if any(per_row):
            images = _processor_images(self.processor, per_row)
            batch.update(dict(self.processor.image_processor(images=images, return_tensors="pt")))
        return batch
