"""What every online method shares: the rollout engine (HF generate, vLLM colocated, rollout server),
reward functions and judges. Import from the submodules; the engine API is re-exported here."""

from .client import RolloutServerClient, RolloutServerError
from .engines import OnlineEngineArgs, Rollout, RolloutEngine, SamplingParams, make_engine

__all__ = ["OnlineEngineArgs", "Rollout", "RolloutEngine", "RolloutServerClient", "RolloutServerError",
           "SamplingParams", "make_engine"]
