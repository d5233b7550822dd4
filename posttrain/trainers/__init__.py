"""One module per method; importing this package registers every method with the CLI."""

from . import sft  # noqa: F401  (one import line per method module; add yours below)
