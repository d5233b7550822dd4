"""What every online method shares: the rollout engine (HF generate, vLLM colocated, rollout server),
reward functions and judges. Import from the submodules; the engine API is re-exported here.

Importing this package loads the engine interface only: the backends (`engine_hf`, `engine_vllm`, the
rollout-server `client`) load when used, and `RolloutServerClient` / `RolloutServerError` when first named.
"""

from .engine_factory import make_engine
from .engines import OnlineEngineArgs, Rollout, RolloutEngine, SamplingParams

__all__ = ["OnlineEngineArgs", "Rollout", "RolloutEngine", "RolloutServerClient", "RolloutServerError",
           "SamplingParams", "make_engine"]

_LAZY = {"RolloutServerClient": "client", "RolloutServerError": "client"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
