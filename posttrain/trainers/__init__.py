"""One module per method; importing this package registers every method with the CLI."""

from . import sft  # noqa: F401  (one import line per method module; add yours below)
from . import dpo  # noqa: F401
from . import reward  # noqa: F401
from . import prm  # noqa: F401
from . import grpo  # noqa: F401
from . import rloo  # noqa: F401
from . import async_grpo  # noqa: F401
from . import cpo  # noqa: F401
from . import orpo  # noqa: F401
from . import kto  # noqa: F401
from . import bco  # noqa: F401
from . import gkd  # noqa: F401
from . import distillation  # noqa: F401
from . import minillm  # noqa: F401
from . import ppo  # noqa: F401
from . import reinforce_pp  # noqa: F401
from . import online_dpo  # noqa: F401
from . import xpo  # noqa: F401
from . import nash_md  # noqa: F401
