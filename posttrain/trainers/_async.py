"""Asynchronous generation inside an online trainer (``async_generation=True``): worker, producer, weight sync.

`AsyncGeneration` is what `OnlineTrainer` holds while ``train()`` runs in the async mode:

- at the first generation it starts a `posttrain serve` worker on 127.0.0.1 (HF backend, vLLM with
  ``use_vllm``; `posttrain.online.rollout_worker`) unless ``vllm_server_base_url`` names a running
  one, connects a `RolloutServerClient` (the trainer's engine from then on) and starts the producer
  (`posttrain.online.async_rollout.AsyncRolloutSource`);
- the loop's source is the producer's queue (``source.next``); generations more than ``max_staleness``
  optimizer steps old are dropped and counted (``async/dropped_stale_*``);
- after every ``weight_sync_steps`` optimizer steps (`WeightSyncCallback`) the trainer snapshots its
  weights and the pusher thread sends them (each request bounded by ``weight_sync_timeout``; other requests by
  ``request_timeout``); a ``weight_transfer`` object given to the trainer (TRL's WeightTransferProtocol:
  ``init_weight_transfer``, ``pause``, ``send_weights``, ``resume``, ``destroy``) replaces the HTTP push, and a
  ``rollout_worker`` object (``start(model, tokenizer) -> url``, ``stop()``, ``alive()``) the trainer's own worker;
- at the end of ``train()`` (or on an error) the producer and the worker are stopped; generations made but
  never trained on are counted (``async/unused_generations``).

Threads: on a CPU-only run with its own worker the trainer sets torch to ``training_num_threads`` (default
1) for the length of ``train()``, and the worker runs with ``generation_num_threads`` (default 1), so on
two cores the generator and the trainer get one core each.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback

from ..online.async_rollout import AsyncRolloutSource
from ..online.engines import default_stop_token_ids
from ..online.pipeline import ScoredRollout
from ..online.weights import iter_merged_weights

__all__ = ["AsyncGeneration", "WeightSyncCallback"]


class AsyncGeneration:
    """The async machinery of one ``train()`` call of ``trainer`` (an `OnlineTrainer`)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.worker: Any = None
        self.source: AsyncRolloutSource | None = None
        self._threads_before: int | None = None
        self._idle_seen = 0.0
        self._transfer_started = self._worker_stopped = False
        #: producer index of the first generation (a resumed run continues the numbering and the seeds)
        self.start_item = 0

    @property
    def own_worker(self) -> bool:
        """Whether the trainer starts (and stops) the worker: its own `RolloutWorker`, or the ``rollout_worker``
        object given to the trainer, unless ``vllm_server_base_url`` names a running server."""
        return getattr(self.trainer, "rollout_worker", None) is not None or not self.trainer.args.vllm_server_base_url

    @property
    def weight_transfer(self) -> Any:
        """The trainer's ``weight_transfer`` object (TRL's WeightTransferProtocol), or None: HTTP pushes."""
        return getattr(self.trainer, "weight_transfer", None)

    # ------------------------------------------------------------------------------------ lifecycle
    def set_threads(self) -> None:
        args = self.trainer.args
        threads = args.training_num_threads
        if threads is None:
            threads = 1 if self.own_worker and args.device.type == "cpu" else 0
        if threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def start(self, start_item: int) -> None:
        """Start (or connect to) the worker, make the client the trainer's engine, start the producer."""
        from ..online.client import RolloutServerClient
        from ..online.rollout_worker import RolloutWorker

        trainer, args = self.trainer, self.trainer.args
        begin = time.perf_counter()
        url = args.vllm_server_base_url
        self._worker_stopped = False
        given = getattr(trainer, "rollout_worker", None)
        if given is not None:  # started and stopped by the trainer, like its own
            self.worker = given
            url = given.start(trainer.model, trainer.tokenizer)
        elif self.own_worker:
            extra = ["--max-n", str(max(256, args.num_generations))]
            if args.use_vllm and args.vllm_kv_cache_gb is not None:
                extra += ["--kv-cache-gb", str(args.vllm_kv_cache_gb)]
            self.worker = RolloutWorker("vllm" if args.use_vllm else "hf", num_threads=args.generation_num_threads,
                                        seed=args.seed, startup_timeout=args.worker_startup_timeout, extra_args=extra)
            url = self.worker.start(trainer.model, trainer.tokenizer)
        client = RolloutServerClient(url, trainer.tokenizer, timeout=args.request_timeout,
                                     weight_timeout=args.weight_sync_timeout,
                                     stop_token_ids=default_stop_token_ids(trainer.tokenizer, trainer.model))
        transfer = self.weight_transfer
        if transfer is not None:
            transfer.init_weight_transfer()
            self._transfer_started = True
        if not self.own_worker:  # an external server holds weights of its own: give it ours
            if transfer is not None:
                transfer.pause()
                transfer.send_weights(iter_merged_weights(trainer.model))
                transfer.resume()
            else:
                client.sync_weights(trainer.model, force=True)
        client.weights_version = trainer.state.global_step
        trainer._engine, trainer._engine_ready = client, True
        per_generation = args.steps_per_generation * args.num_iterations

        def generate(k: int, rows: list[dict]) -> Any:
            params = trainer.sampling_params("train", k * per_generation)
            return trainer.generate_rollout(rows, params, "train", engine=client)  # tools: the loop runs here

        self.source = AsyncRolloutSource(
            client, trainer._prompts, generate=generate, score=lambda rows, rollout: trainer.score(rows, rollout, "train"),
            current_version=lambda: trainer.state.global_step, max_staleness=args.max_staleness,
            queue_maxsize=args.queue_maxsize, max_inflight_tasks=args.max_inflight_tasks,
            timeout=args.vllm_server_timeout, worker=self.worker, start_item=start_item, weight_transfer=transfer)
        trainer.timings["worker_start"] += time.perf_counter() - begin

    def stop(self) -> None:
        """Stop the producer and the worker (idempotent); count what was generated and never trained on;
        restore the torch threads; the engine goes back to the config's (it was the worker's client)."""
        trainer = self.trainer
        if self.source is not None:
            unused = self.source.close()
            trainer._totals["train/async/unused_generations"] = float(unused)
            trainer.counts["async_weight_syncs"] += float(self.source.stats.snapshots)
        if trainer._engine is not None and self.source is not None:
            trainer._engine.close()
            trainer._engine, trainer._engine_ready = None, False
        if self.worker is not None and not self._worker_stopped:
            self._worker_stopped = True  # a worker given to the trainer may not be idempotent like ours
            self.worker.stop()
        if self._transfer_started:
            self._transfer_started = False
            self.weight_transfer.destroy()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    # ------------------------------------------------------------------------------------- the loop
    def next(self, index: int, refill: int) -> ScoredRollout:
        if self.source is None:
            self.start(self.start_item)
        source, trainer = self.source, self.trainer
        before = (source.stats.dropped_generations, source.stats.dropped_completions)
        scored = source.next(index, refill)
        dropped = (source.stats.dropped_generations - before[0], source.stats.dropped_completions - before[1])
        trainer.counts["async_dropped_stale_generations"] += dropped[0]
        trainer.counts["async_dropped_stale_completions"] += dropped[1]
        trainer._totals["train/async/dropped_stale_generations"] = trainer.counts["async_dropped_stale_generations"]
        trainer._totals["train/async/dropped_stale_completions"] = trainer.counts["async_dropped_stale_completions"]
        idle = source.generator_idle_s()
        scored.metrics["async/generator_idle_s"] = idle - self._idle_seen
        self._idle_seen = idle
        trainer.timings["trainer_wait"] += scored.metrics["async/trainer_wait_s"]
        trainer.timings["generator_idle"] = idle
        return scored

    def state_before_next(self) -> dict[str, int]:
        if self.source is None:
            return {**self.trainer._prompts.state_dict(), "item": self.start_item}
        return self.source.state_before_next()

    def push(self) -> None:
        if self.source is not None:
            self.source.push_weights(self.trainer.model, self.trainer.state.global_step)
            self.trainer.timings["sync"] = self.source.stats.snapshot_s


class WeightSyncCallback(TrainerCallback):
    """Push the weights to the async worker every ``weight_sync_steps`` optimizer steps."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run = self.trainer._async
        if run is not None and state.global_step % args.weight_sync_steps == 0:
            run.push()
