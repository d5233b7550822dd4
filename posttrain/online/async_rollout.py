"""Asynchronous generation: a producer that runs ahead of training, and the consumer the loop reads from.

::

    trainer process                                                   rollout worker process
    ---------------                                                   ----------------------
    producer thread: PromptStream -> rows --(HTTP /generate)--------> `posttrain serve` (HF or vLLM)
                     score(rows, rollout) -> ScoredRollout(weight_version)
                     -> bounded queue (queue_maxsize generations)
    training thread: AsyncRolloutSource.next() <- queue; drops samples older than max_staleness
                     prepare (old/ref log-probs, current weights) -> micro-batches -> optimizer step
                     every weight_sync_steps steps: push weights --(HTTP /update_weights)--> worker

One queue item is one generation's prompts (``prompts_per_generation`` of them, ``num_generations``
completions each) with the rewards the trainer's `score` stage gave them (the reward functions run in the
producer thread) and the policy version the worker sampled with (optimizer steps, as
`RolloutEngine.weights_version`). Up to ``max_inflight_tasks`` requests are in flight at once; results
enter the queue in the order their prompts were drawn, and item ``k`` is sampled with the seed of
generation ``k`` (so a run is reproducible up to staleness, and a resumed run draws the same prompts).

Weight pushes and generation requests exclude each other (a readers-writer lock): a request never sees
half-updated weights, and its version tag is exact.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .engines import Rollout, RolloutEngine
from .pipeline import PromptStream, ScoredRollout
from .weights import iter_merged_weights

__all__ = ["AsyncRolloutArgs", "AsyncRolloutSource", "RolloutWorkerDied"]


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class AsyncRolloutArgs:
    """Config fields of asynchronous generation (TRL 1.16's AsyncGRPOConfig names where they overlap);
    mixed into every online method's config."""

    async_generation: bool = field(default=False, metadata=_help(
        "Generate in another process, ahead of training (a producer thread feeds a bounded queue; the trainer "
        "trains on what it finds there). With nothing else set the trainer starts its own `posttrain serve` "
        "worker on 127.0.0.1 (HF backend; vLLM with use_vllm) and stops it at the end. CLI: --async.",
        aliases=["--async"]))
    vllm_server_base_url: str | None = field(default=None, metadata=_help(
        "async_generation: use this running `posttrain serve` (http://host:port) instead of starting a worker."))
    max_staleness: int = field(default=4, metadata=_help(
        "async_generation: drop (and count) generations sampled with weights more than this many optimizer "
        "steps older than the policy being trained."))
    queue_maxsize: int = field(default=2, metadata=_help(
        "async_generation: most generations (scored rollouts of one generation batch each) waiting in the "
        "queue; the producer blocks when it is full."))
    max_inflight_tasks: int = field(default=1, metadata=_help(
        "async_generation: most generation requests in flight at once (-1: queue_maxsize)."))
    weight_sync_steps: int = field(default=1, metadata=_help(
        "async_generation: push the trained weights to the worker every this many optimizer steps."))
    generation_num_threads: int | None = field(default=1, metadata=_help(
        "async_generation: torch threads of the worker the trainer starts (None: torch's default)."))
    training_num_threads: int | None = field(default=None, metadata=_help(
        "async_generation: torch threads of the trainer during train(). None: 1 when the trainer starts its own "
        "worker on a CPU-only run (the two processes get a core each), else unchanged; 0: unchanged. "
        "The previous setting is restored when train() returns."))
    worker_startup_timeout: float = field(default=300.0, metadata=_help(
        "async_generation: seconds the trainer waits for its worker to start and answer /health."))
    request_timeout: int = field(default=600, metadata=_help(
        "async_generation: socket timeout in seconds of each HTTP request to the rollout worker (a generation, a "
        "health check); a request that gets no reply in time raises instead of hanging (TRL's AsyncGRPOConfig)."))
    weight_sync_timeout: int = field(default=1800, metadata=_help(
        "async_generation: timeout in seconds of each request of a weight push to the rollout worker; a push that "
        "does not complete in time raises (in the training thread) instead of hanging the run."))

    def __post_init__(self) -> None:
        for name in ("max_staleness", "weight_sync_steps", "queue_maxsize"):
            low = 0 if name == "max_staleness" else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)}: expected an integer >= {low}")
        if self.max_inflight_tasks == -1:
            self.max_inflight_tasks = self.queue_maxsize
        if self.max_inflight_tasks < 1:
            raise ValueError(f"max_inflight_tasks={self.max_inflight_tasks}: expected >= 1 or -1 (auto)")
        for name in ("request_timeout", "weight_sync_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected seconds > 0")
        for name in ("generation_num_threads", "training_num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: expected None or an integer >= 0")
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()  # type: ignore[misc]


class RolloutWorkerDied(RuntimeError):
    """The rollout worker (or server) stopped answering while the trainer waited for generations."""


class _ReadWriteLock:
    """Many readers (generation requests) or one writer (a weight push); a waiting writer goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers, self._writing, self._waiting_writers = 0, False, 0

    def acquire_read(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting_writers)
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._waiting_writers -= 1
            self._writing = True

    def release_write(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


@dataclass
class _Stats:
    """Producer/consumer measurements, in seconds and counts (read by the trainer for its metrics)."""

    trainer_wait_s: float = 0.0
    generator_idle_s: float = 0.0
    produced: int = 0
    consumed: int = 0
    dropped_generations: int = 0
    dropped_completions: int = 0
    pushes: int = 0
    push_s: float = 0.0  # pusher thread: sending (incl. waiting for the request in flight)
    snapshots: int = 0  # push_weights calls (the last may still be unsent when training stops)
    snapshot_s: float = 0.0  # training thread: serializing the weights
    superseded_pushes: int = 0


class AsyncRolloutSource:
    """A `RolloutSource` fed by a producer thread (see the module docstring).

    ``generate(k, rows) -> Rollout`` asks the engine for generation ``k``'s completions (the trainer binds
    the seed of generation ``k``); ``score(rows, rollout) -> ScoredRollout`` is the trainer's score stage;
    ``current_version()`` the policy's version now (optimizer steps). ``worker``: the `RolloutWorker`
    when the trainer started one (its death is reported by name). ``start_item``: the producer index of
    the first generation (a resumed run continues the numbering). ``timeout``: the longest the trainer
    waits for one generation before failing.
    """

    def __init__(self, engine: RolloutEngine, prompts: PromptStream, *, generate: Callable[[int, list[dict]], Rollout],
                 score: Callable[[list[dict], Rollout], ScoredRollout], current_version: Callable[[], int],
                 max_staleness: int, queue_maxsize: int, max_inflight_tasks: int, timeout: float,
                 worker: Any = None, start_item: int = 0, weight_transfer: Any = None) -> None:
        self.engine, self.prompts, self.worker = engine, prompts, worker
        self.weight_transfer = weight_transfer
        self._generate, self._score, self._version = generate, score, current_version
        self.max_staleness, self.timeout = max_staleness, timeout
        self._queue: queue.Queue[Future] = queue.Queue(maxsize=queue_maxsize)
        self._pool = ThreadPoolExecutor(max_inflight_tasks, thread_name_prefix="posttrain-rollout")
        self._slots = threading.Semaphore(max_inflight_tasks)
        self._lock = threading.Lock()  # prompt stream, item numbering, pending states
        self._weights = _ReadWriteLock()
        self._pending: collections.deque[tuple[int, dict]] = collections.deque()  # (item, prompt state) in order
        self._item = start_item
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.stats = _Stats()
        self._busy, self._idle_since = 0, time.perf_counter()
        self._stats_lock = threading.Lock()
        self._push_cond = threading.Condition()
        self._push_next: tuple[list[bytes], int] | None = None
        self._pushing = False
        self._push_error: BaseException | None = None
        self._pusher = threading.Thread(target=self._push_loop, name="posttrain-weight-push", daemon=True)
        self._pusher.start()
        self._thread = threading.Thread(target=self._produce, name="posttrain-producer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- producer side
    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._slots.acquire(timeout=0.1):
                    continue
                with self._lock:
                    state = {**self.prompts.state_dict(), "item": self._item}
                    rows = self.prompts.next_rows()
                    k, self._item = self._item, self._item + 1
                    self._pending.append((k, state))
                future = self._pool.submit(self._task, k, rows)
                future.add_done_callback(lambda _: self._slots.release())
                while not self._stop.is_set():
                    try:
                        self._queue.put(future, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self._error = err

    def _task(self, k: int, rows: list[dict]) -> ScoredRollout:
        self._weights.acquire_read()
        try:
            with self._stats_lock:
                if self._busy == 0:
                    self.stats.generator_idle_s += time.perf_counter() - self._idle_since
                self._busy += 1
            version = self.engine.weights_version
            try:
                rollout = self._generate(k, rows)
            finally:
                with self._stats_lock:
                    self._busy -= 1
                    if self._busy == 0:
                        self._idle_since = time.perf_counter()
        finally:
            self._weights.release_read()
        scored = self._score(rows, rollout)
        scored.weight_version = version
        with self._stats_lock:
            self.stats.produced += 1
        return scored

    # ------------------------------------------------------------------------------- trainer side
    def push_weights(self, model: Any, version: int) -> None:
        """Give the engine ``model``'s weights, tagged ``version``. With the rollout-server client the trainer
        only snapshots them (serialized blobs) and a pusher thread sends them as soon as no request is in
        flight, so training goes on meanwhile (the server loads weights between generations anyway); a newer
        snapshot replaces one not yet sent. Other engines, and a ``weight_transfer`` object (TRL's
        ``WeightTransferProtocol``: ``pause``, ``send_weights((name, tensor) pairs)``, ``resume``), are synced
        here and now, with no generation request in flight."""
        self._raise_push_error()
        start = time.perf_counter()
        snapshot = getattr(self.engine, "iter_weight_blobs", None)
        if self.weight_transfer is not None or snapshot is None:
            self._weights.acquire_write()
            try:
                if self.weight_transfer is not None:  # TRL's WeightTransferProtocol: pause, stream, resume
                    self.weight_transfer.pause()
                    self.weight_transfer.send_weights(iter_merged_weights(model))
                    self.weight_transfer.resume()
                else:
                    self.engine.sync_weights(model, force=True)
                self.engine.weights_version = version
            finally:
                self._weights.release_write()
        else:
            blobs = list(snapshot(model))
            with self._push_cond:
                replaced = self._push_next is not None
                self._push_next = (blobs, version)
                self._push_cond.notify_all()
            self.stats.superseded_pushes += int(replaced)
        self.stats.snapshots += 1
        self.stats.snapshot_s += time.perf_counter() - start

    def _push_loop(self) -> None:
        while True:
            with self._push_cond:
                self._push_cond.wait_for(lambda: self._push_next is not None or self._stop.is_set())
                if self._stop.is_set():
                    return
                (blobs, version), self._push_next = self._push_next, None
                self._pushing = True
            start = time.perf_counter()
            self._weights.acquire_write()
            try:
                self.engine.send_weight_blobs(blobs)
                self.engine.weights_version = version
                self.engine.sync_count += 1
            except BaseException as err:  # noqa: BLE001 - raised in the training thread (next push or next())
                self._push_error = err
            finally:
                self._weights.release_write()
                with self._push_cond:
                    self._pushing = False
                    self._push_cond.notify_all()
            self.stats.pushes += 1
            self.stats.push_s += time.perf_counter() - start

    def wait_for_push(self, timeout: float | None = None) -> bool:
        """Block until no weight push is pending or being sent (tests; the end of training)."""
        with self._push_cond:
            done = self._push_cond.wait_for(lambda: self._push_next is None and not self._pushing, timeout)
        self._raise_push_error()
        return done

    def _worker_dead(self, grace: float = 0.0) -> bool:
        """Whether our worker has exited; a request that just failed may see it a moment before the exit
        is reaped, hence ``grace`` seconds of waiting."""
        if self.worker is None:
            return False
        deadline = time.monotonic() + grace
        while self.worker.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.worker.alive()

    def _raise_push_error(self) -> None:
        if self._push_error is not None:
            err, self._push_error = self._push_error, None
            if self._worker_dead(grace=2.0):
                raise RolloutWorkerDied(f"the rollout worker died during a weight push: "
                                        f"{self.worker.describe_exit()}") from err
            raise RuntimeError(f"pushing weights to the rollout engine failed: {type(err).__name__}: {err}") from err

    def _check_alive(self, what: str) -> None:
        self._raise_push_error()
        if self._error is not None:
            raise RuntimeError(f"the rollout producer failed: {type(self._error).__name__}: {self._error}") \
                from self._error
        if self.worker is not None and not self.worker.alive():
            raise RolloutWorkerDied(f"the rollout worker died while the trainer waited for {what}: "
                                    f"{self.worker.describe_exit()}")

    def _take(self) -> ScoredRollout:
        deadline = time.monotonic() + self.timeout
        while True:
            self._check_alive("generations")
            try:
                future = self._queue.get(timeout=0.2)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RolloutWorkerDied(f"no generation arrived within {self.timeout:g} s (vllm_server_timeout): "
                                            "the rollout worker is stuck or too slow") from None
        while True:
            try:
                return future.result(timeout=0.2)
            except TimeoutError:
                self._check_alive("a generation request")
                if time.monotonic() > deadline:
                    raise RolloutWorkerDied(f"a generation request took more than {self.timeout:g} s "
                                            "(vllm_server_timeout)") from None
            except Exception as err:
                if self._worker_dead(grace=2.0):
                    raise RolloutWorkerDied(f"the rollout worker died during a generation request: "
                                            f"{self.worker.describe_exit()}") from err
                raise

    def next(self, index: int, refill: int = 0) -> ScoredRollout:
        """The next generation that is at most ``max_staleness`` versions old (older ones are dropped and
        counted in ``stats``); its ``metrics`` carry the staleness, the queue depth and the wait."""
        start = time.perf_counter()
        while True:
            scored = self._take()
            with self._lock:
                self._pending.popleft()
            self.stats.consumed += 1
            staleness = self._version() - scored.weight_version
            if staleness <= self.max_staleness:
                break
            self.stats.dropped_generations += 1
            self.stats.dropped_completions += len(scored)
        waited = time.perf_counter() - start
        self.stats.trainer_wait_s += waited
        scored.metrics.update({"async/staleness": float(staleness), "async/queue_depth": float(self._queue.qsize()),
                               "async/trainer_wait_s": waited})
        return scored

    def state_before_next(self) -> dict[str, int]:
        """The prompt stream's state (and producer index ``item``) before the next generation `next` returns:
        what a checkpoint stores, so that a resumed run regenerates whatever was still queued."""
        with self._lock:
            if self._pending:
                return dict(self._pending[0][1])
            return {**self.prompts.state_dict(), "item": self._item}

    def generator_idle_s(self) -> float:
        """Seconds so far with no generation request in flight (the worker waited for the producer)."""
        with self._stats_lock:
            idle = self.stats.generator_idle_s
            if self._busy == 0:
                idle += time.perf_counter() - self._idle_since
            return idle

    def close(self) -> int:
        """Stop the producer; return the number of generations made but never trained on (queued or in
        flight), which the trainer reports."""
        self._stop.set()
        with self._push_cond:
            self._push_cond.notify_all()
        self._thread.join(timeout=10)
        while True:
            try:
                self._queue.get_nowait().cancel()
            except queue.Empty:
                break
        with self._lock:
            unused = len(self._pending)
        self._pool.shutdown(wait=False, cancel_futures=True)  # a request in flight ends when the worker stops
        return unused
