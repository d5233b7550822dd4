"""Rollouts with vLLM colocated in the training process (``use_vllm=True, vllm_mode="colocate"``).

vLLM's engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights are copied
tensor to tensor with no serialization: :meth:`VLLMEngine.sync_weights` feeds
:func:`~posttrain.online.weights.iter_merged_weights` (LoRA merged per layer) to the worker's
``reload_weights`` (vLLM's in-place, layer-by-layer reload, which re-runs each layer's weight
processing, e.g. the CPU backend's oneDNN packing), refreshes the output head when it is tied to the
embeddings (the reload only re-processes one of the tied layers), then resets the prefix cache.

vLLM starts from a folder: the model's own local folder when it has one (the current in-memory weights
are synced right after start), otherwise a temporary export of the current (merged) weights. Prompts go
in as token ids and texts are decoded with the trainer's tokenizer, so vLLM never needs one
(``skip_tokenizer_init``). Log-probs use ``logprobs_mode="processed_logprobs"``: the distribution after
penalties, temperature, min-p, top-k and top-p, as the other engines report.

CPU settings (see the project notes on vLLM on CPU): float32, eager mode, an explicit KV cache
(``kv_cache_memory_bytes``, default 1 GiB), head_dim 64 models. vLLM's in-process start-up seeds the
global RNGs, patches ``torch.set_num_threads`` and sets LD_PRELOAD / LOCAL_WORLD_SIZE; all are restored here.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..ops.wrappers import unwrap_model

from .engines import Rollout, RolloutEngine, SamplingParams, default_stop_token_ids, encode_prompts
from .weights import iter_merged_weights

__all__ = ["VLLMEngine", "vllm_available", "export_for_vllm"]


def vllm_available() -> bool:
    """Whether vLLM can be imported here (``scripts/install_vllm.sh`` installs the CPU build)."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def _on_gpu(model: nn.Module) -> bool:
    try:
        return next(model.parameters()).device.type == "cuda"
    except StopIteration:
        return torch.cuda.is_available()


def export_for_vllm(model: nn.Module, folder: str | Path) -> Path:
    """Write config, generation config and the current (LoRA-merged) weights as a safetensors checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = unwrap_model(model)
    if not getattr(base.config, "architectures", None):  # a model built in memory has none; vLLM needs it
        base.config.architectures = [type(base).__name__]
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in iter_merged_weights(model)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _local_checkpoint(model: nn.Module) -> str | None:
    """The model's own folder, when it is a local checkpoint vLLM can read."""
    path = getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", "") or ""
    folder = Path(path)
    if path and folder.is_dir() and (folder / "config.json").exists() and \
            any(folder.glob("*.safetensors")):
        return str(folder)
    return None


def _refresh_tied_heads(model: nn.Module) -> None:
    """Re-run weight processing of vocab embeddings/heads: after a layerwise reload a tied ``lm_head``
    keeps the kernel prepared from the old embedding (on CPU its packed GEMM weights)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (UnquantizedEmbeddingMethod,
                                                                     VocabParallelEmbedding)

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and \
                isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)


class VLLMEngine(RolloutEngine):
    """A ``vllm.LLM`` in this process, fed the trainer's weights by :meth:`sync_weights`."""

    samples_from_policy = False

    def __init__(self, model: nn.Module | str, tokenizer: Any, *, gpu_memory_utilization: float | None = None,
                 kv_cache_gb: float | None = None, dtype: str = "auto", enforce_eager: bool | None = None,
                 max_model_len: int | None = None, sync_every: int = 1, seed: int = 0,
                 stop_token_ids: Sequence[int] | None = None, sync_on_start: bool = True) -> None:
        """``model``: the training model (its current weights are used) or a checkpoint folder / hub name."""
        super().__init__(sync_every=sync_every)
        self.tokenizer = tokenizer
        self._tmpdir: str | None = None
        self.llm: Any = None
        if isinstance(model, str):
            path, gpu = model, torch.cuda.is_available()
            self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None \
                else default_stop_token_ids(tokenizer, path)
            sync_on_start = False
        else:
            self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None \
                else default_stop_token_ids(tokenizer, model)
            gpu = _on_gpu(unwrap_model(model, strip_peft=False))
            path = _local_checkpoint(model)
            if path is None:
                self._tmpdir = tempfile.mkdtemp(prefix="posttrain-vllm-")
                path = str(export_for_vllm(model, self._tmpdir))
                sync_on_start = False
        self.model_path = path
        self.settings = dict(
            model=path, skip_tokenizer_init=True, seed=seed, logprobs_mode="processed_logprobs",
            dtype=("auto" if gpu else "float32") if dtype == "auto" else dtype,
            enforce_eager=(not gpu) if enforce_eager is None else enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization or (0.3 if gpu else 0.2),
            max_model_len=max_model_len,
        )
        if kv_cache_gb is not None or not gpu:
            self.settings["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * 2**30)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            # One engine per training rank, reusing the launcher's process group (untested on CPU).
            self.settings["distributed_executor_backend"] = "external_launcher"
            self.settings["seed"] = seed + torch.distributed.get_rank()
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.llm = self._start(self.settings)
        if sync_on_start:
            self.sync_weights(model, force=True)

    @staticmethod
    def _start(settings: dict[str, Any]) -> Any:
        """Create the ``vllm.LLM`` in-process, restoring RNG states, ``torch.set_num_threads`` and env vars."""
        env = {k: os.environ.get(k) for k in _ENV_TO_RESTORE}
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("use_vllm=True needs vLLM: run scripts/install_vllm.sh (CPU build) or "
                              "`pip install vllm` on a GPU machine") from err
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        rng = (random.getstate(), torch.random.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        np_rng = _numpy_rng()
        try:
            return LLM(**{k: v for k, v in settings.items() if v is not None})
        finally:
            for key, value in env.items():  # vLLM sets these for its own workers; keep the trainer's
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            random.setstate(rng[0])
            torch.random.set_rng_state(rng[1])
            if rng[2] is not None:
                torch.cuda.set_rng_state_all(rng[2])
            if np_rng is not None:
                import numpy as np
                np.random.set_state(np_rng)

    def _vllm_params(self, params: SamplingParams, n: int, seed: int | None) -> Any:
        from vllm import SamplingParams as VParams

        stops = list(dict.fromkeys(self.stop_token_ids + list(params.stop_token_ids or [])))
        return VParams(
            n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, max_tokens=params.max_new_tokens, seed=seed,
            logprobs=0, ignore_eos=not params.stop_on_eos, stop_token_ids=stops if params.stop_on_eos else None,
            detokenize=False, skip_special_tokens=False)

    def generate(self, prompts: Sequence[Any], params: SamplingParams) -> Rollout:
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        # vLLM refuses n > 1 when greedy: send each prompt n times instead.
        from vllm.inputs import TokensPrompt

        copies = params.n if params.greedy else 1
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(copies)]
        # A seed is per request in vLLM (its n samples get seed + i): give each prompt its own range, so that
        # prompts do not share random streams.
        per_request = [self._vllm_params(params, params.n // copies,
                                         None if params.seed is None else params.seed + k * params.n)
                       for k in range(len(requests))]
        outputs = self.llm.generate(requests, per_request, use_tqdm=False)
        stop_set = set(self.stop_token_ids + list(params.stop_token_ids or [])) if params.stop_on_eos else set()
        rows: list[int] = []
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        for k, request_output in enumerate(outputs):
            for out in request_output.outputs:
                ids = list(out.token_ids)
                rows.append(k // copies)
                completions.append(ids)
                logprobs.append([float(step[tok].logprob) for step, tok in zip(out.logprobs, ids)])
        return Rollout(
            prompt_index=rows, prompt_ids=[prompt_ids[i] for i in rows], completion_ids=completions,
            texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True), logprobs=logprobs,
            truncated=[not (c and c[-1] in stop_set) for c in completions],
        ).check()

    def _push_weights(self, model: nn.Module) -> None:
        self.load_named_weights(iter_merged_weights(model))
        self.reset_cache()

    def load_named_weights(self, pairs: Iterable[tuple[str, Tensor]]) -> None:
        """Reload ``(checkpoint name, tensor)`` pairs in place. Each decoder layer present must come whole
        in one call (vLLM processes a layer once all its weights arrived); absent layers are kept."""
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(pairs),
                                                                  is_checkpoint_format=True))
            self.llm.apply_model(_refresh_tied_heads)

    def reset_cache(self) -> None:
        """Forget cached prefixes (their KV was computed with the old weights)."""
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
            if self._owns_process_group:
                _destroy_vllm_distributed()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


# Set by vLLM's start-up for its workers; they would leak into the trainer's subprocesses and launcher checks.
_ENV_TO_RESTORE = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LOCAL_WORLD_SIZE")


def _numpy_rng() -> Any:
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def _destroy_vllm_distributed() -> None:
    """Tear down the process group vLLM created in this process, so another engine can start later."""
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        return
    destroy_model_parallel()
    destroy_distributed_environment()
