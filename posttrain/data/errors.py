"""The error every dataset check raises (its own module, so the format and vision checks can share it)."""

from __future__ import annotations

__all__ = ["DatasetFormatError"]


class DatasetFormatError(ValueError):
    """A dataset (or one of its rows) does not match the format a method needs."""
