"""Async generation (AsyncGRPOTrainer, ``async_generation=True``): masked IS, the producer/consumer source,
the worker's lifecycle, a worker killed mid-run, resume; the reward-raising runs are slow / vllm tests."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from transformers import TrainerCallback

from posttrain import AsyncGRPOConfig, AsyncGRPOTrainer
from posttrain.losses import grpo_loss, importance_weights, masked_importance_weights
from posttrain.models import build_tiny
from posttrain.online.async_rollout import AsyncRolloutSource, RolloutWorkerDied
from posttrain.online.engines import Rollout
from posttrain.online.pipeline import PromptStream, ScoredRollout
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.rloo import RLOOConfig, RLOOTrainer

from _online_helpers import _one_thread, digit_share, history, text_length  # noqa: F401  (_one_thread: autouse)


def _config(cls=AsyncGRPOConfig, **kw):
    base = dict(output_dir="/tmp/posttrain-test-async", num_generations=4, per_device_train_batch_size=8,
                max_completion_length=6, max_steps=3, logging_steps=1, report_to="none", learning_rate=1e-2,
                log_completions=False, save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                vllm_server_timeout=60)
    base.update(kw)
    return cls(**base)


def _data(n=64):
    return ArithmeticTask(digits=2).prompt_only(n)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split()[2] != "Z"


# ------------------------------------------------------------------------------------- masked IS (pure)
def test_masked_importance_weights_match_a_written_out_computation():
    old = torch.tensor([[0.0, -1.0, -2.0, -0.1]])
    sampler = torch.tensor([[0.0, -0.2, -0.5, -2.0]])
    # rho = exp(old - sampler) = [1, e^-0.8 = 0.449, e^-1.5 = 0.223, e^1.9 = 6.686]; kept in [0.4, 2]
    expected = torch.tensor([[1.0, 0.449329, 0.0, 0.0]])
    assert torch.allclose(masked_importance_weights(old, sampler, 0.4, 2.0), expected, atol=1e-5)
    assert torch.allclose(importance_weights(old, sampler, "mask", cap=2.0, low=0.4), expected, atol=1e-5)
    truncated = torch.tensor([[1.0, 0.449329, 0.223130, 2.0]])
    assert torch.allclose(importance_weights(old, sampler, "truncate", cap=2.0), truncated, atol=1e-5)
    with pytest.raises(ValueError, match="'truncate' or 'mask'"):
        importance_weights(old, sampler, "clip")


def test_grpo_loss_applies_masked_weights_per_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -3.0, -1.1]])  # rho = [1, e^2 = 7.39 (masked), e^0.1 = 1.105]
    mask, adv = torch.ones(1, 3), torch.tensor([1.0])
    loss, metrics = grpo_loss(logps, adv, mask, sampler_logps=sampler, loss_type="bnpo", is_mode="mask",
                              is_low=0.5, is_high=2.0)
    # r = 1 (old = logps.detach()), so the per-token loss is -w * A: -(1 + 0 + 1.10517) / 3
    assert loss.item() == pytest.approx(-(1 + 1.105171) / 3, abs=1e-5)
    assert metrics["sampling/importance_sampling_ratio/min"].item() == 0.0
    loss.backward()
    assert torch.allclose(logps.grad, -torch.tensor([[1.0, 0.0, 1.105171]]) / 3, atol=1e-5)


# ---------------------------------------------------------------------- the source, without processes
class _FakeEngine:
    """Generates instantly; one completion per prompt; the trainer's thread moves ``weights_version``."""

    def __init__(self):
        self.weights_version, self.sync_count, self.seen = 0, 0, []

    def generate(self, k, rows):
        self.seen.append(k)
        n = len(rows)
        return Rollout(list(range(n)), [[1]] * n, [[2, 3]] * n, ["ab"] * n, [[-0.5, -0.5]] * n, [False] * n)

    def sync_weights(self, model, force=False):
        self.sync_count += 1


def _stream():
    return PromptStream([{"prompt": f"p{i}", "prompt_ids": [i + 1]} for i in range(8)], per_process=2, seed=0)


def _source_prompts(n=12):
    stream = _stream()
    return [stream.next_rows() for _ in range(n)]


def _source(engine, version, generate=None, **kw):
    prompts = _stream()
    return AsyncRolloutSource(engine, prompts, generate=generate or engine.generate,
                              score=lambda rows, rollout: ScoredRollout(rows, rollout, list(rollout.texts)),
                              current_version=lambda: version[0], timeout=5, **kw)


def test_source_drops_stale_generations_counts_them_and_keeps_order():
    engine, version = _FakeEngine(), [0]
    source = _source(engine, version, max_staleness=1, queue_maxsize=3, max_inflight_tasks=2)
    try:
        first = source.next(0)
        assert first.weight_version == 0 and first.metrics["async/staleness"] == 0
        deadline = time.monotonic() + 5
        while source._queue.qsize() < 3 and time.monotonic() < deadline:  # the producer fills the queue
            time.sleep(0.01)
        version[0] = 5  # the policy moved on: everything queued (version 0) is now 5 steps old
        source.push_weights(None, 5)  # engine without blobs: synced now, tagged 5
        fresh = source.next(1)
        assert fresh.weight_version == 5 and fresh.metrics["async/staleness"] == 0
        assert source.stats.dropped_generations >= 3  # the queued ones (and any made before the push)
        assert source.stats.dropped_completions == 2 * source.stats.dropped_generations
        assert engine.sync_count == 1
        # items are consumed in the order their prompts were drawn, none skipped uncounted
        assert source.stats.consumed == 2 + source.stats.dropped_generations
        order = _source_prompts()
        assert first.rows == order[0] and fresh.rows == order[source.stats.consumed - 1]
        state = source.state_before_next()
        assert state["item"] == source.stats.consumed  # a checkpoint would regenerate what is still queued
    finally:
        unused = source.close()
    assert unused >= 0


def test_source_reports_a_failing_producer_instead_of_waiting():
    engine, version = _FakeEngine(), [0]

    def broken(k, rows):
        raise ConnectionError("boom")

    source = _source(engine, version, broken, max_staleness=1, queue_maxsize=1, max_inflight_tasks=1)
    try:
        with pytest.raises(ConnectionError, match="boom"):
            source.next(0)
    finally:
        source.close()


# ------------------------------------------------------------------------------ with a real worker
class _Record(TrainerCallback):
    def __init__(self):
        self.pids, self.versions = [], []

    def on_step_end(self, args, state, control, **kw):
        run = self.trainer._async
        self.pids.append(run.worker.pid)
        self.versions.append(self.trainer.engine.weights_version)


class _SpyAsync(AsyncGRPOTrainer):
    def prepare(self, scored, mode):
        if mode == "train":
            self.trained_prompts.append([r["prompt"] for r in scored.rows])
            self.sample_versions.append(scored.weight_version)
        return super().prepare(scored, mode)


def _spy(args, **kw):
    model, tok = build_tiny("nano")
    trainer = _SpyAsync(model=model, reward_funcs=[text_length], args=args, train_dataset=_data(),
                        processing_class=tok, **kw)
    trainer.trained_prompts, trainer.sample_versions = [], []
    return trainer


def test_async_resume_matches_an_uninterrupted_run_and_the_worker_is_gone(tmp_path):
    def run(out, max_steps, resume=None):
        trainer = _spy(_config(output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=2,
                               seed=5, max_staleness=8))
        record = _Record()
        record.trainer = trainer
        trainer.add_callback(record)
        threads = torch.get_num_threads()
        trainer.train(resume_from_checkpoint=resume)
        assert torch.get_num_threads() == threads  # restored after train()
        return trainer, record

    full, rec = run(tmp_path / "full", 4)
    pid = rec.pids[0]
    assert not _pid_alive(pid), "the worker outlived train()"
    assert full._engine is None and full._async is None
    assert full.counts["completions"] == 4 * 8 and full.counts["async_weight_syncs"] == 4
    logged = full.state.log_history[0]
    for key in ("async/staleness", "async/queue_depth", "async/trainer_wait_s", "async/generator_idle_s",
                "async/dropped_stale_generations", "sampling/importance_sampling_ratio/mean"):
        assert key in logged, key
    # the worker's version: the optimizer step of the last snapshot it loaded (sent in the background)
    assert rec.versions == sorted(rec.versions) and 0 <= rec.versions[0] <= 1 and rec.versions[-1] <= 4

    run(tmp_path / "part", 2)
    with open(tmp_path / "part" / "checkpoint-2" / "online_state.json") as f:
        saved = json.load(f)
    assert saved["weights_version"] == 2 and saved["generations"] == 2 and saved["prompts"]["item"] == 2
    resumed, rec2 = run(tmp_path / "part", 4, resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == full.state.global_step == 4
    assert resumed.counts["completions"] == full.counts["completions"] == 32
    assert resumed.trained_prompts == full.trained_prompts[2:]  # the same prompts, none lost, none twice
    assert min(resumed.sample_versions) == 2  # the restored weight version tags the first new samples
    assert not _pid_alive(rec2.pids[0])


class _KillWorker(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            self.pid = self.trainer._async.worker.pid
            os.kill(self.pid, signal.SIGKILL)


def test_a_killed_worker_stops_rloo_training_with_a_message_that_says_so():
    model, tok = build_tiny("nano")
    args = _config(RLOOConfig, async_generation=True, max_steps=50, queue_maxsize=1, beta=0.0,
                   vllm_server_timeout=30)
    trainer = RLOOTrainer(model=model, reward_funcs=[text_length], args=args, train_dataset=_data(),
                          processing_class=tok)
    killer = _KillWorker()
    killer.trainer = trainer
    trainer.add_callback(killer)
    start = time.monotonic()
    with pytest.raises(RolloutWorkerDied, match=r"rollout worker died.*killed by signal 9"):
        trainer.train()
    assert time.monotonic() - start < 60
    assert trainer.state.global_step < 50
    assert not _pid_alive(killer.pid) and trainer._async is None
    assert not [t for t in threading.enumerate() if t.name.startswith("posttrain-producer") and t.is_alive()]


def test_async_config_fields_and_cli_switch():
    from posttrain.cli import parse_method_args

    *_, config = parse_method_args("grpo", ["--async", "--output_dir", "/tmp/x", "--max_staleness", "2"])
    assert config.async_generation is True and config.max_staleness == 2
    *_, config = parse_method_args("async_grpo", ["--output_dir", "/tmp/x"])
    assert config.async_generation is True and config.weight_sync_steps == 1 and config.queue_maxsize == 2
    with pytest.raises(ValueError, match="max_staleness=-1"):
        _config(max_staleness=-1)
    with pytest.raises(ValueError, match="importance_sampling_mode='clip'"):
        _config(importance_sampling_mode="clip")
    assert _config(max_inflight_tasks=-1, queue_maxsize=3).max_inflight_tasks == 3
    model, tok = build_tiny("nano")
    from posttrain.online.engine_hf import HFEngine
    with pytest.raises(ValueError, match="drop engine="):
        AsyncGRPOTrainer(model=model, reward_funcs=[text_length], args=_config(), train_dataset=_data(),
                         processing_class=tok, engine=HFEngine(model, tok))


# ------------------------------------------------------------------ learning, end to end (slow, vllm)
def _raises_mean_reward(**engine_fields):
    model, tok = build_tiny(engine_fields.pop("spec", "nano"))
    args = _config(num_generations=8, per_device_train_batch_size=16, max_completion_length=8, max_steps=32,
                   learning_rate=2e-2, logging_steps=4, max_staleness=2, **engine_fields)
    trainer = AsyncGRPOTrainer(model=model, reward_funcs=[digit_share], args=args, train_dataset=_data(200),
                               processing_class=tok)
    trainer.train()
    rewards = history(trainer, "reward")
    print(f"AsyncGRPO {engine_fields or 'hf'}: reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; "
          f"dropped {trainer.counts['async_dropped_stale_generations']}")
    assert rewards[0] < 0.05 and rewards[-1] > 0.5, rewards
    assert trainer.state.global_step == 32


@pytest.mark.slow
def test_async_grpo_raises_mean_reward_with_its_own_hf_worker():
    _raises_mean_reward()


@pytest.mark.vllm
def test_async_grpo_raises_mean_reward_with_its_own_vllm_worker():
    _raises_mean_reward(use_vllm=True, vllm_kv_cache_gb=0.5, spec="hidden=256,layers=2,heads=4",
                        vllm_server_timeout=600, worker_startup_timeout=600)


# ------------------------------------------------- TRL 1.16 AsyncGRPO fields and constructor parameters
class _Transfer:
    """TRL's WeightTransferProtocol, recording the calls and the weight names sent."""

    def __init__(self):
        self.calls, self.names = [], []

    def init_weight_transfer(self):
        self.calls.append("init")

    def pause(self):
        self.calls.append("pause")

    def send_weights(self, iterator):
        self.calls.append("send")
        self.names += [name for name, _ in iterator]

    def resume(self):
        self.calls.append("resume")

    def destroy(self):
        self.calls.append("destroy")


def test_source_pushes_weights_through_a_weight_transfer_object():
    engine, version, transfer = _FakeEngine(), [0], _Transfer()
    model, _ = build_tiny("nano")
    source = _source(engine, version, max_staleness=1, queue_maxsize=1, max_inflight_tasks=1,
                     weight_transfer=transfer)
    try:
        source.push_weights(model, 3)
    finally:
        source.close()
    assert transfer.calls == ["pause", "send", "resume"] and engine.sync_count == 0  # not the engine's own sync
    assert engine.weights_version == 3
    assert set(transfer.names) == {n for n, _ in model.named_parameters()}


def test_client_bounds_weight_pushes_by_weight_sync_timeout_and_other_requests_by_request_timeout():
    from posttrain.online.client import RolloutServerClient

    client = object.__new__(RolloutServerClient)
    client.timeout, client.weight_timeout, seen = 600, 1800, []
    client._request = lambda method, path, body=None, **kw: seen.append((path, kw.get("timeout"))) or {}
    client.send_weight_blobs([b"a", b"b"])
    assert seen == [("/update_weights", 1800), ("/update_weights", 1800), ("/reset", None)]  # None: timeout


def test_async_generation_uses_the_given_worker_transfer_and_timeouts(monkeypatch):
    import posttrain.online.client as client_module
    import posttrain.trainers._async as async_module

    made = {}

    class _Client:
        def __init__(self, url, tokenizer, **kw):
            made.update(url=url, **kw)
            self.weights_version = 0

        def close(self):
            made["closed"] = True

    class _Source:
        def __init__(self, engine, prompts, **kw):
            made["source"] = kw
            self.stats = type("S", (), {"snapshots": 0})()

        def close(self):
            return 0

    class _Worker:
        def __init__(self):
            self.calls = []

        def start(self, model, tokenizer):
            self.calls.append("start")
            return "http://127.0.0.1:1"

        def stop(self):
            self.calls.append("stop")

        def alive(self):
            return True

        def describe_exit(self):
            return ""

    monkeypatch.setattr(client_module, "RolloutServerClient", _Client)
    monkeypatch.setattr(async_module, "AsyncRolloutSource", _Source)
    model, tok = build_tiny("nano")
    worker, transfer = _Worker(), _Transfer()
    trainer = AsyncGRPOTrainer(model, [text_length], _config(request_timeout=7, weight_sync_timeout=9),
                               _data(8), processing_class=tok, rollout_worker=worker, weight_transfer=transfer)
    run = async_module.AsyncGeneration(trainer)
    run.start(0)
    run.stop()
    run.stop()  # idempotent: the transfer is destroyed once
    assert worker.calls == ["start", "stop"] and made["url"] == "http://127.0.0.1:1"
    assert made["timeout"] == 7 and made["weight_timeout"] == 9 and made["source"]["weight_transfer"] is transfer
    assert transfer.calls == ["init", "destroy"]  # our worker loads the trainer's weights: no first push
    with pytest.raises(TypeError, match=r"lacks \['alive', 'describe_exit'\]"):
        AsyncGRPOTrainer(model, [text_length], _config(), _data(8), processing_class=tok,
                         rollout_worker=type("W", (), {"start": lambda s: 0, "stop": lambda s: 0})())
    with pytest.raises(ValueError, match="async_generation=True"):
        AsyncGRPOTrainer(model, [text_length], _config(async_generation=False), _data(8), processing_class=tok,
                         weight_transfer=transfer)
    with pytest.raises(ValueError, match="request_timeout=0"):
        _config(request_timeout=0)


def test_async_grpo_dtype_loads_a_named_model_and_inapplicable_fields_warn_once(caplog):
    trainer = AsyncGRPOTrainer("tiny:nano", [text_length], _config(dtype="bfloat16"), _data(8))
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    trainer = AsyncGRPOTrainer("tiny:nano", [text_length], _config(model_init_kwargs={"dtype": "float16"}), _data(8))
    assert next(trainer.model.parameters()).dtype == torch.float16  # model_init_kwargs wins over dtype
    assert next(AsyncGRPOTrainer("tiny:nano", [text_length], _config(), _data(8)).model.parameters()).dtype \
        == torch.float32  # TRL's default
    with pytest.raises(ValueError, match="dtype='fp8'"):
        _config(dtype="fp8")
    caplog.clear()
    with caplog.at_level("WARNING"):
        AsyncGRPOTrainer("tiny:nano", [text_length], _config(token_budget=64, fork_threshold_tokens=8), _data(8))
    for name in ("token_budget", "fork_threshold_tokens"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    assert not any("heartbeat_stale_after_s" in r.getMessage() for r in caplog.records)  # at its default
