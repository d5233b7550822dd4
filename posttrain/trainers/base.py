"""What every posttrain trainer shares: the config base class and the Trainer base class.

`PostTrainConfig` subclasses `transformers.TrainingArguments`, so every Trainer option (DeepSpeed, FSDP,
report_to, checkpointing and resume) works unchanged. `PostTrainer` subclasses `transformers.Trainer` and adds
what post-training needs on top: `args` as the method's config (a plain `TrainingArguments` converted) and
seeded before anything random is built (see `_args`), a model given by name (`tiny:<spec>`, a folder or a hub
name), the tokenizer and its chat template, PEFT, dataset validation and tokenization through the shared data
pipeline, averaged per-method metrics logged through `report_to`, and per-example eval predictions for
`compute_metrics` and `predict()` where a method has them (`eval_predictions`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, ClassVar, Sequence

import datasets
import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..data import DatasetKind, FormatInfo, load_any, load_held_out, trainer_tokenizer, validate_dataset
from ..data.vision import is_processor
from ..data.streaming import TokenizedStream, is_stream, require_max_steps, stream_format
from ..models import apply_peft, freeze_vision, is_peft_model, load_model, load_processing_class
from ..ops.attention import use_varlen_attention
from ..ops.fast_paths import cpu_bf16_is_fast, cpu_fast_paths, head_precision
from ..ops.memory import tune_cpu_allocator
from ._args import as_method_config, seed_run
from ._compat import (activation_offloading_context, apply_token_fields, disable_dropout_in_model, model_from_init,
                      quantized_model_kwargs, read_chat_template_path, warn_inapplicable)
from ._router_aux import RouterAuxLoss
from ._trl_fields import TRLSharedFields
from .callbacks import LossPlotCallback, ReleaseBuffersCallback, RichProgressCallback

logger = logging.getLogger(__name__)

__all__ = ["PostTrainConfig", "PostTrainer"]


def _cpu_only_multiprocess_launch() -> bool:
    """True under a multi-process launcher (``WORLD_SIZE > 1``) on a machine with no accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return not _has_accelerator()


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def _bf16_default(use_cpu: bool) -> bool:
    """bf16 mixed precision where it is fast: a GPU that supports it, or a CPU whose bf16 products beat
    float32 (native AVX512_BF16/AMX, probed once per process); float32 elsewhere (AVX2-only CPUs emulate bf16)."""
    if torch.cuda.is_available() and not use_cpu:
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_is_fast()


@dataclass
class PostTrainConfig(TRLSharedFields, TrainingArguments):
    """Fields shared by every posttrain method, on top of `transformers.TrainingArguments`.

    Defaults differ from TrainingArguments where post-training wants otherwise: logging every 10 steps,
    `remove_unused_columns=False` (trainers choose their own columns), bf16 only where a GPU supports it
    (float32 on CPU, where bf16 matrix products are very slow).
    """

    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for loading the model when `model` is a name or path, as a dict "
                  "or a JSON string, e.g. '{\"dtype\": \"bfloat16\", \"attn_implementation\": \"sdpa\"}'."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template: a registry name (chatml, llama2, llama3, mistral, zephyr, alpaca, vicuna, "
                  "gemma, phi3, plain) or a Jinja string. Default: the tokenizer's own, else chatml."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest tokenized sequence; longer rows are truncated, counted and reported. None: no limit."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Flatten each batch into one row with per-sequence position ids (no padding tokens "
                  "computed). Sequences never attend to each other."},
    )
    logits_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk when computing log-probs from hidden states and the output head "
                  "(the full [batch, length, vocab] logits are never held). None: about 32 MiB of logits per chunk."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset tokenization."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": (
        "Vision-language models: train no parameter of the vision tower (the image encoder).")})
    freeze_projector: bool = field(default=False, metadata={"help": (
        "Vision-language models: train no parameter of the projector between the vision tower and the language "
        "model.")})
    # Overridden TrainingArguments defaults.
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (or a ratio of all steps if < 1)."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: posttrain trainers select the columns they need."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (bf16 matmuls; float32 weights, optimizer state "
                                "and loss math). Default (unset, or 'auto' from Python): on where it is faster, "
                                "i.e. a GPU that supports it or a CPU with native bf16 (AVX512_BF16/AMX, probed "
                                "at run time), float32 elsewhere."}
    )
    cpu_fast_paths: bool = field(
        default=True, metadata={"help": "CPU speed paths chosen at run time from the hardware (oneDNN weight "
                                "packing, the kept-probability buffer pool, the KV-cache decode step, glibc "
                                "malloc tuning). False runs the plain PyTorch paths (same results up to float "
                                "rounding)."}
    )
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin host memory in data loaders."})

    def __post_init__(self) -> None:
        if isinstance(self.model_init_kwargs, str):
            try:
                self.model_init_kwargs = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"model_init_kwargs must be a JSON object, got {self.model_init_kwargs!r}: {err}")
        if self.chat_template is not None and self.chat_template_path is not None:
            raise ValueError("set chat_template or chat_template_path, not both")
        if self.output_dir is None:
            self.output_dir = f"runs/{type(self).__name__.removesuffix('Config').lower() or 'posttrain'}"
        if not self.use_cpu and _cpu_only_multiprocess_launch():
            # transformers only sets up DDP on a machine without an accelerator when use_cpu is set: without it,
            # every process of `torchrun` / `accelerate launch` would train its own copy, silently
            logger.info("several processes on a machine without an accelerator: use_cpu=True (DDP over gloo)")
            self.use_cpu = True
        if self.bf16 is None or self.bf16 == "auto":
            self.bf16 = _bf16_default(self.use_cpu)
        if self.bf16 and not self.use_cpu and not _has_accelerator():
            self.use_cpu = True  # transformers runs bf16 autocast on a CPU only with use_cpu set
        super().__post_init__()


class PostTrainer(Trainer):
    """Base class of every posttrain trainer.

    Subclasses declare `accepted_formats` (the dataset kinds they train on) and implement
    `tokenize_row(row, info) -> dict` (one dataset row to token ids and masks) plus `compute_loss`.
    Metrics a subclass records with `store_metrics` are averaged over the logging interval and logged with
    the Trainer's own logs (so they reach every `report_to` integration).
    """

    accepted_formats: ClassVar[Sequence[DatasetKind]] = ()
    config_class: ClassVar[type[PostTrainConfig]] = PostTrainConfig
    model_task: ClassVar[str] = "causal-lm"
    _tag_names: ClassVar[list[str]] = ["posttrain"]

    def __init__(
        self,
        model: str | PreTrainedModel | torch.nn.Module | None = None,
        args: PostTrainConfig | TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        *,
        model_init: Callable[[], Any] | None = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        compute_metrics: Callable[[Any], dict] | None = None,
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        quantization_config: Any = None,
        **kwargs: Any,
    ) -> None:
        model = model_from_init(model, model_init)
        if model is None:
            raise ValueError(f"{type(self).__name__} needs a model (a model object, a name or path, or tiny:<spec>)")
        kwargs.update(compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
        self._quantization_kwargs = quantized_model_kwargs(quantization_config, model)
        self._set_compute_loss_func(compute_loss_func)
        args = self.resolve_args(args)
        self._check_eval_metrics_supported(kwargs)
        seed_run(args)  # before the model, its adapters or its heads are built (TRL order)
        self.model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        model = self.load_model(model, args)
        self._model_config = getattr(model, "config", None)
        if getattr(args, "disable_dropout", False):
            disable_dropout_in_model(model)
        if processing_class is None:
            tok_kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
            processing_class = load_processing_class(self.model_id or model.name_or_path, **tok_kwargs)
        # A copy where the pad token or the chat template must change: the caller's object is never modified.
        template = args.chat_template if args.chat_template_path is None else read_chat_template_path(
            args.chat_template_path)
        if args.pad_token is not None or args.eos_token is not None:
            import copy
            processing_class = copy.deepcopy(processing_class)
            apply_token_fields(getattr(processing_class, "tokenizer", processing_class), args.pad_token, args.eos_token)
        processing_class, self.tokenizer = trainer_tokenizer(processing_class, template)
        # A VLM's processor (its tokenizer is self.tokenizer): tokenization expands image tokens through it.
        self.processor = processing_class if is_processor(processing_class) else None
        self._warn_inapplicable_fields(args, model)
        if args.padding_free or getattr(args, "packing", False):
            # Padding-free rows on SDPA/eager: per-sequence attention instead of a dense [T, T] block mask.
            use_varlen_attention(model)
        if args.freeze_vision_tower or args.freeze_projector:
            frozen = freeze_vision(model, tower=args.freeze_vision_tower, projector=args.freeze_projector)
            logger.info("froze %d vision parameters (tower: %s, projector: %s)", frozen, args.freeze_vision_tower,
                        args.freeze_projector)
        peft_config = self.prepare_peft_config(model, args, peft_config)
        if peft_config is not None:
            model = apply_peft(model, peft_config)
        if args.gradient_checkpointing and is_peft_model(model):
            model.enable_input_require_grads()
        if hasattr(args, "router_aux_loss_coef"):  # a MoE model's load-balancing loss, on by default as in TRL
            router = RouterAuxLoss(model, args.router_aux_loss_coef, type(self).__name__)
            if router.enabled:
                self.compute_loss = router.wrap(self.compute_loss, self.store_metrics)
        self.args = args  # prepare_dataset reads it before Trainer.__init__ sets it
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._totals: dict[str, float] = defaultdict(float)
        if train_dataset is not None:
            train_dataset = self.prepare_dataset(train_dataset, "train")
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict) and not isinstance(eval_dataset, datasets.Dataset):
                eval_dataset = {k: self.prepare_dataset(v, f"eval/{k}") for k, v in eval_dataset.items()}
            else:
                eval_dataset = self.prepare_dataset(eval_dataset, "eval")
        if data_collator is None:
            data_collator = self.make_collator()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        if self.is_world_process_zero() and not args.disable_tqdm:
            self.remove_callback(ProgressCallback)
            self.remove_callback(PrinterCallback)
            self.add_callback(RichProgressCallback())
        if self.is_world_process_zero():
            self.add_callback(LossPlotCallback())
        self.add_callback(ReleaseBuffersCallback())

    # ------------------------------------------------------------------------------------------ args
    @classmethod
    def resolve_args(cls, args: Any) -> PostTrainConfig:
        """`args` as this method's config: None gives the defaults; a plain `TrainingArguments` (or another
        method's config) is converted, the fields it set carried over and the rest at this method's defaults."""
        return as_method_config(args, cls.config_class)

    # ----------------------------------------------------------------------------------------- model
    def load_model(self, model: Any, args: PostTrainConfig) -> torch.nn.Module:
        """Resolve `model` (a loaded model, `tiny:<spec>`, a folder or a hub name) into a model object."""
        if not isinstance(model, str):
            if args.model_init_kwargs:
                logger.warning("model_init_kwargs are ignored because the model is already loaded")
            return model
        return load_model(model, task=self.model_task, **self.model_load_kwargs(args))

    def model_load_kwargs(self, args: PostTrainConfig) -> dict[str, Any]:
        """`model_init_kwargs` plus `trust_remote_code` and the constructor's `quantization_config`."""
        kwargs = dict(args.model_init_kwargs or {})
        if args.trust_remote_code:
            kwargs.setdefault("trust_remote_code", True)
        kwargs.update(getattr(self, "_quantization_kwargs", {}))
        return kwargs

    #: Config fields this trainer accepts for TRL compatibility that do nothing here, with the reason; the ones
    #: set to a non-default value are warned about once, at construction. Subclasses extend it.
    inapplicable_fields: ClassVar[dict[str, str]] = {}

    def _warn_inapplicable_fields(self, args: PostTrainConfig, model: torch.nn.Module) -> None:
        reasons = dict(self.inapplicable_fields)
        if args.activation_offloading and str(args.device).startswith("cpu"):
            reasons["activation_offloading"] = "training runs on the CPU, where activations already are"
        warn_inapplicable(args, reasons, type(self).__name__)

    def _set_compute_loss_func(self, func: Callable[..., torch.Tensor] | None) -> None:
        """TRL's ``compute_loss_func(outputs, labels, num_items_in_batch)``: only trainers whose loss is a
        per-token one on the model's outputs (SFT) can use it; the others refuse it rather than ignore it."""
        if func is not None and not getattr(self, "accepts_compute_loss_func", False):
            raise ValueError(f"{type(self).__name__} does not take compute_loss_func: its loss is the method's "
                             "own (see its loss_type); SFTTrainer takes one")
        self._user_loss_func = func

    def compute_loss_context_manager(self):
        """The Trainer's context (autocast), plus activation offloading where asked for."""
        stack = contextlib.ExitStack()
        stack.enter_context(super().compute_loss_context_manager())
        stack.enter_context(activation_offloading_context(bool(getattr(self.args, "activation_offloading", False)),
                                                          self.args.device))
        return stack

    def prepare_peft_config(self, model: torch.nn.Module, args: PostTrainConfig, peft_config: Any) -> Any:
        """Hook run on the loaded model just before PEFT wraps it; returns the PEFT config to apply (None: no
        PEFT). The reward trainers initialize their head here and add it to the modules PEFT trains and saves."""
        return peft_config

    # ------------------------------------------------------------------------------------------ data
    def prepare_dataset(self, dataset: Any, name: str) -> datasets.Dataset:
        """Load, validate and tokenize one dataset; report (never silently drop) truncated rows. A stream
        (`IterableDataset`) is validated and tokenized row by row as it is read (`prepare_stream`)."""
        if isinstance(dataset, TokenizedStream):
            return dataset
        if is_stream(dataset):
            return self.prepare_stream(dataset, name)
        # an eval set given as a folder or a DatasetDict is its held-out split, never its train split
        dataset = load_held_out(dataset) if name.startswith("eval") else load_any(dataset)
        info = validate_dataset(dataset, self.accepted_formats)
        self.check_format(info)
        dataset = self.preprocess_dataset(dataset, info)
        tokenized = dataset.map(
            lambda row: self.tokenize_row(row, info),
            remove_columns=dataset.column_names,
            num_proc=self.args.dataset_num_proc,
            desc=f"Tokenizing {name} ({info.kind.value}{', conversational' if info.conversational else ''})",
        )
        if "truncated" in tokenized.column_names:
            n_truncated = sum(tokenized["truncated"])
            if n_truncated:
                logger.warning(
                    "%s: %d of %d rows were longer than max_length=%s and were truncated",
                    name, n_truncated, len(tokenized), self.args.max_length,
                )
            self._totals[f"data/{name}/truncated_rows"] = n_truncated
            tokenized = tokenized.remove_columns("truncated")
        return tokenized

    def preprocess_dataset(self, dataset: datasets.Dataset, info: FormatInfo) -> datasets.Dataset:
        """Hook for whole-dataset rewrites before tokenization (e.g. unpairing preference pairs)."""
        return dataset

    def prepare_stream(self, dataset: Any, name: str) -> TokenizedStream:
        """A streamed dataset as a `TokenizedStream`: its format told once from its first row, here in the main
        process, then every row validated (its index and field named on error), tokenized and counted as it
        is read. `stream_options` gives the method's per-row steps."""
        if name == "train":
            require_max_steps(self.args.max_steps, name)
        format_row = self.stream_row_formatter(name)
        info = stream_format(dataset, self.accepted_formats, name, format_row)
        self.check_format(info)
        return TokenizedStream(dataset, info, self.tokenize_row, name=name, totals=self._totals,
                               format_row=format_row, **self.stream_options(info, name))

    def stream_row_formatter(self, name: str) -> Any:
        """A function ``(row, index) -> row`` applied to every streamed row before validation (None: none)."""
        return None

    def stream_options(self, info: FormatInfo, name: str) -> dict[str, Any]:
        """The method's per-row steps for a stream (`TokenizedStream`'s expand, keep, window and packing
        arguments): the row-by-row form of what `preprocess_dataset` and `prepare_dataset` do to a dataset."""
        return {}

    def check_format(self, info: FormatInfo) -> None:
        """Hook: refuse a format the config cannot train on (called for datasets and streams alike)."""

    def tokenize_row(self, row: dict, info: FormatInfo) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement tokenize_row")

    def make_collator(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement make_collator or get a data_collator")

    # --------------------------------------------------------------------------------------- metrics
    @property
    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def store_metrics(self, metrics: dict[str, float | torch.Tensor], mode: str | None = None) -> None:
        """Record metrics of one micro-batch; they are averaged over the logging interval."""
        bucket = self._metrics[mode or self._mode]
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean().item() if value.numel() else float("nan")
            bucket[key].append(float(value))

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        """Reduce (NaN-aware) and clear the stored metrics of `mode`, plus its running totals as they stand.

        A metric is averaged over the logging interval, except keys ending in ``_min`` / ``/min`` (the minimum)
        and ``_max`` / ``/max`` (the maximum). With several processes every process calls this at the same
        point (the Trainer logs on all of them), and the reduction covers every process's values, not process
        0's alone."""
        stats: dict[str, list[float]] = {}  # key -> [sum, count, min, max]
        for key, values in self._metrics[mode].items():
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                stats[key] = [sum(finite), float(len(finite)), min(finite), max(finite)]
        world = self.accelerator.num_processes if hasattr(self, "accelerator") else 1
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, stats)
            stats = {}
            for part in gathered:
                for key, (total, count, low, high) in part.items():
                    acc = stats.setdefault(key, [0.0, 0.0, math.inf, -math.inf])
                    acc[0], acc[1] = acc[0] + total, acc[1] + count
                    acc[2], acc[3] = min(acc[2], low), max(acc[3], high)
        reduced = {}
        for key, (total, count, low, high) in stats.items():
            if key.endswith(("_min", "/min")):
                reduced[key] = low
            elif key.endswith(("_max", "/max")):
                reduced[key] = high
            else:
                reduced[key] = total / count
        reduced.update({k.split("/", 1)[1]: v for k, v in self._totals.items() if k.startswith(f"{mode}/")})
        self._metrics[mode].clear()
        return reduced

    # ------------------------------------------------------------ the CPU speed paths and head precision, scoped
    def _speed_settings(self) -> contextlib.ExitStack:
        """The run's CPU fast paths and the output head's matmul dtype (bf16/fp16 under mixed precision, unless
        ``cast_lm_head_to_fp32``), entered around training, evaluation and prediction."""
        args = self.args
        head = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        if getattr(args, "cast_lm_head_to_fp32", False):
            head = None
        stack = contextlib.ExitStack()
        stack.enter_context(cpu_fast_paths(args.cpu_fast_paths))
        stack.enter_context(head_precision(head))
        return stack

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.args.cpu_fast_paths and self.args.device.type == "cpu":
            tune_cpu_allocator()  # large tensors back to the OS on free: no RSS creep on CPU
        with self._speed_settings():
            return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._speed_settings():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._speed_settings():
            return super().predict(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        averaged = self._flush_metrics(mode) if mode == "train" else {}
        super().log({**logs, **averaged}, start_time)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """The Trainer's loop, with this method's own eval metrics added to what `evaluate()` returns."""
        self._metrics["eval"].clear()
        self._totals = defaultdict(float, {k: v for k, v in self._totals.items() if not k.startswith("eval/")})
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update({f"{prefix}_{k}": v for k, v in self._flush_metrics("eval").items()})
        return output

    # ------------------------------------------------------------------------------------ evaluation
    def eval_predictions(self, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> tuple[Any, Any]:
        """`(predictions, label_ids)` of one evaluation batch, the batch's rows on the first axis: what
        `compute_metrics` receives (as an `EvalPrediction`) and `predict()` returns. `outputs` is what
        `compute_loss(..., return_outputs=True)` returned. Trainers that have per-example predictions
        override this; the others have none, and refuse `compute_metrics` rather than never calling it."""
        return None, None

    @classmethod
    def _has_eval_predictions(cls) -> bool:
        return cls.eval_predictions is not PostTrainer.eval_predictions

    def _check_eval_metrics_supported(self, kwargs: dict[str, Any]) -> None:
        if self._has_eval_predictions():
            return
        for name in ("compute_metrics", "preprocess_logits_for_metrics"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{type(self).__name__} does not take {name}: it has no per-example eval predictions to "
                    f"give it, so it would never be called. Its evaluation metrics (the loss and the method's "
                    f"own metrics) are logged as eval_* by evaluate(); SFTTrainer, RewardTrainer and PRMTrainer "
                    f"call compute_metrics.")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The method's own loss (and its metrics; posttrain inputs carry no `labels`), plus the predictions of
        `eval_predictions` when they are asked for (`compute_metrics`, or `predict()`)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only or not self._has_eval_predictions():
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            predictions, labels = self.eval_predictions(model, inputs, outputs)
        return loss.detach(), predictions, labels

    # ---------------------------------------------------------------------------------------- saving
    def save_merged_model(self, output_dir: str | None = None) -> str:
        """Merge PEFT adapters into the base weights and save a plain model (plus tokenizer) to `output_dir`.

        Training keeps the adapters separate (only they train and `save_model` stores only them); this is the
        on-request merge for deployment. The trainer's own model is left unmerged.
        """
        import copy

        output_dir = output_dir or f"{self.args.output_dir}/merged"
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        return output_dir
