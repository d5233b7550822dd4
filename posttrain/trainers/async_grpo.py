"""Async GRPO: GRPO with generation running ahead of training in another process (TRL's AsyncGRPOTrainer).

``AsyncGRPOTrainer`` is `GRPOTrainer` with ``async_generation=True``: a producer thread asks a rollout
worker (a `posttrain serve` process the trainer starts on 127.0.0.1, or the one at
``vllm_server_base_url``) for completions, scores them and queues them; the trainer trains on the queue,
drops generations more than ``max_staleness`` optimizer steps old (counted), corrects for the stale
sampler with importance weights (``importance_sampling_mode``: truncated by default, or masked), and
pushes its weights to the worker every ``weight_sync_steps`` steps. The algorithm is GRPO's
(`posttrain.trainers.grpo`); the machinery is `posttrain.trainers._async` and
`posttrain.online.async_rollout`. RLOO takes the same switch (``RLOOConfig(async_generation=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._compat import (CallbacksArg, DatasetArg, EvalDatasetArg, ModelArg, OptimizersArg, PeftConfigArg,
                      ProcessingClassArg, QuantizationArg)
from ._online_config import RewardArgs, reward_trainer_kwargs
from .grpo import GRPOConfig, GRPOTrainer
from .registry import register_method

__all__ = ["AsyncGRPOConfig", "AsyncGRPOTrainer"]


@dataclass
class AsyncGRPOConfig(GRPOConfig):
    """`GRPOConfig` with ``async_generation=True`` (field names follow TRL 1.16's AsyncGRPOConfig:
    ``max_staleness``, ``queue_maxsize``, ``weight_sync_steps``, ``max_inflight_tasks``,
    ``vllm_server_base_url``; see `posttrain.online.async_rollout.AsyncRolloutArgs`)."""

    async_generation: bool = field(default=True, metadata={"help": (
        "Generate in a rollout worker ahead of training (always on for async_grpo; False runs plain GRPO).")})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps (TRL's AsyncGRPOConfig: 1)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": (
        "Learning-rate schedule (TRL's AsyncGRPOConfig: constant).")})
    dtype: str = field(default="float32", metadata={"help": (
        "Dtype a model given by name is loaded in: 'auto', 'bfloat16', 'float16' or 'float32' (TRL's default: the "
        "trainer and the generator then agree in precision). A 'dtype' in model_init_kwargs takes precedence; a "
        "model object keeps its own."), "choices": ["auto", "bfloat16", "float16", "float32"]})
    fork_threshold_tokens: int = field(default=1024, metadata={"help": (
        "TRL's re-tokenization drift limit when a multi-turn conversation is rebuilt into training rows. No effect "
        "here (warned when changed): posttrain's multi-turn loop keeps the token ids it generated, so no "
        "conversation is re-tokenized.")})
    token_budget: int | None = field(default=None, metadata={"help": (
        "TRL's token-budgeted micro-batching. No effect here (warned when set): micro-batches are "
        "per_device_train_batch_size completions (padding_free packs them without padding).")})
    heartbeat_stale_after_s: float = field(default=300.0, metadata={"help": (
        "TRL's worker heartbeat limit. No effect here (warned when changed): the trainer watches its worker "
        "process directly (an exit is reported at once) and gives up on a generation after vllm_server_timeout "
        "and on one request after request_timeout.")})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype={self.dtype!r}: expected 'auto', 'bfloat16', 'float16' or 'float32'")
        super().__post_init__()


_WORKER_METHODS = ("start", "stop", "alive", "describe_exit")
_TRANSFER_METHODS = ("init_weight_transfer", "pause", "send_weights", "resume", "destroy")


class AsyncGRPOTrainer(GRPOTrainer):
    """``AsyncGRPOTrainer(model, reward_funcs, args=AsyncGRPOConfig(...), train_dataset, processing_class)``.

    ``rollout_worker``: a worker the trainer starts at the first generation and stops at the end instead of
    its own `posttrain.online.rollout_worker.RolloutWorker` (same interface: ``start(model, tokenizer)``
    returns the URL of a `posttrain serve`-compatible server; ``stop()``, ``alive()``, ``describe_exit()``).
    ``weight_transfer``: an object with TRL's WeightTransferProtocol methods (``init_weight_transfer``,
    ``pause``, ``send_weights(iterator of (name, tensor))``, ``resume``, ``destroy``) that replaces the HTTP
    weight push (a no-op one disables trainer-side syncs)."""

    config_class: ClassVar = AsyncGRPOConfig
    _tag_names: ClassVar = ["posttrain", "grpo", "async-grpo"]
    inapplicable_fields: ClassVar[dict[str, str]] = {
        **GRPOTrainer.inapplicable_fields,
        "fork_threshold_tokens": "the multi-turn loop keeps its generated token ids; nothing is re-tokenized",
        "token_budget": "micro-batches are per_device_train_batch_size completions, not token-budgeted",
        "heartbeat_stale_after_s": "the worker process is watched directly; waits are bounded by "
                                   "vllm_server_timeout and request_timeout",
    }

    def __init__(self, model: ModelArg, reward_funcs: Any = None, args: AsyncGRPOConfig | None = None,
                 train_dataset: DatasetArg = None, eval_dataset: EvalDatasetArg = None,
                 processing_class: ProcessingClassArg = None, reward_processing_classes: Any = None,
                 callbacks: CallbacksArg = None, optimizers: OptimizersArg = (None, None),
                 quantization_config: QuantizationArg = None, peft_config: PeftConfigArg = None,
                 tools: list | None = None, rollout_func: Any = None, environment_factory: Any = None,
                 rollout_worker: Any = None, weight_transfer: Any = None, *, ref_model: ModelArg | None = None,
                 engine: Any = None) -> None:
        for obj, methods, name in ((rollout_worker, _WORKER_METHODS, "rollout_worker"),
                                   (weight_transfer, _TRANSFER_METHODS, "weight_transfer")):
            lacking = [m for m in methods if obj is not None and not callable(getattr(obj, m, None))]
            if lacking:
                raise TypeError(f"{name}={type(obj).__name__} lacks {lacking}: expected an object with {list(methods)}")
        self.rollout_worker, self.weight_transfer = rollout_worker, weight_transfer
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
                         reward_processing_classes, callbacks, optimizers, quantization_config, peft_config, tools,
                         rollout_func, environment_factory, ref_model=ref_model, engine=engine)
        if (rollout_worker is not None or weight_transfer is not None) and not self.args.async_generation:
            raise ValueError("rollout_worker= and weight_transfer= are used by asynchronous generation: keep "
                             "async_generation=True")

    def model_load_kwargs(self, args: AsyncGRPOConfig) -> dict[str, Any]:
        """The base's, with TRL's ``dtype`` unless ``model_init_kwargs`` names one."""
        kwargs = super().model_load_kwargs(args)
        if getattr(args, "dtype", None) is not None:
            kwargs.setdefault("dtype", args.dtype)
        return kwargs


register_method(
    "async_grpo", AsyncGRPOConfig, AsyncGRPOTrainer,
    help="Async GRPO: GRPO with generation in a rollout worker running ahead of training (same as grpo --async).",
    extra_args=(RewardArgs,), trainer_kwargs=reward_trainer_kwargs, task_format="prompt_only",
)
