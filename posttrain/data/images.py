"""TRL's vision data shape, checked without a processor: which column holds the images, how to open one, and
whether each row has as many images as image parts. Imported by the format checks (`formats`) and by the
vision tokenization (`vision`), which needs the chat templates; kept apart so the checks need neither.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DatasetFormatError

__all__ = ["IMAGE_COLUMNS", "PART_TYPES", "count_image_parts", "image_column", "is_processor", "load_image",
           "row_images", "validate_images"]

IMAGE_COLUMNS = ("images", "image")
PART_TYPES = ("text", "image")


def is_processor(processing_class: Any) -> bool:
    """True for a multimodal processor (it has an image processor beside its tokenizer)."""
    return getattr(processing_class, "image_processor", None) is not None and hasattr(processing_class, "tokenizer")


def image_column(names: Sequence[str]) -> str | None:
    """The dataset's image column (`images`, else `image`), or None."""
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def row_images(row: Mapping[str, Any]) -> list[Any]:
    """A row's images as a list (`images`, or `image` as a one-element list; none: [])."""
    if "images" in row and row["images"] is not None:
        value = row["images"]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if "image" in row and row["image"] is not None:
        return [row["image"]]
    return []


def load_image(value: Any) -> Any:
    """A PIL image (RGB) from a PIL image, a file path, raw bytes or a `datasets.Image` dict `{"bytes", "path"}`."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        raise TypeError(f"not an image: {type(value).__name__} (expected a PIL image, a path, bytes or "
                        "a datasets.Image {'bytes', 'path'} dict)")
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def count_image_parts(messages: Any) -> int:
    """How many `{"type": "image"}` parts a conversation (or one string) has."""
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, Mapping) and p.get("type") == "image")


def validate_images(rows_images: Sequence[Any], conversations: Sequence[Sequence[Any]], column: str) -> None:
    """Check every row's images open and that their count equals the row's image parts (over `conversations`,
    the row's conversational fields); a bad row raises `DatasetFormatError` naming the row and the field."""
    for i, value in enumerate(rows_images):
        images = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        for k, image in enumerate(images):
            where = f"{column}[{k}]" if column == "images" else column
            try:
                load_image(image)
            except Exception as err:  # noqa: BLE001 - any reason it cannot be opened is the row's problem
                raise DatasetFormatError(f"row {i}, field '{where}': the image cannot be opened "
                                         f"({type(err).__name__}: {err})") from None
        parts = sum(count_image_parts(conv) for conv in conversations[i])
        if parts != len(images):
            raise DatasetFormatError(
                f"row {i}, field '{column}': the row has {len(images)} image(s) but its messages have {parts} "
                "{'type': 'image'} part(s); each image part takes the row's next image")
