"""One module per method; importing this package registers every method with the CLI."""

from . import sft  # noqa: F401  (one import line per method module; add yours below)
from . import dpo  # noqa: F401
from . import reward  # noqa: F401
from . import prm  # noqa: F401
