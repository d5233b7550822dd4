"""The run-time speed choices: bf16 only where this CPU multiplies faster in it, the config fields that override
the choice, one switch (`cpu_fast_paths`) for the CPU speed paths, and bf16 mixed precision's numerics against
float32 on a real forward and backward."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from posttrain import SFTConfig, SFTTrainer
from posttrain.models import build_tiny
from posttrain.ops import fast_paths, logprobs, packed_linear
from posttrain.ops.fast_paths import cpu_bf16_is_fast, cpu_fast_paths, cpu_has_native_bf16, fast_paths_enabled
from posttrain.ops.forward import token_logps
from posttrain.online import decode_loop
from posttrain.trainers import base

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 fma\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


def test_native_bf16_comes_from_the_cpu_flags():
    assert cpu_has_native_bf16(ZEN4)
    assert cpu_has_native_bf16("flags : avx2 amx_bf16 amx_tile")
    assert not cpu_has_native_bf16(AVX2)
    assert not cpu_has_native_bf16("")


@pytest.fixture
def probe(monkeypatch):
    """The bf16 probe with the CPU flags and the two matmul timings given by the test."""
    timings: dict = {}
    monkeypatch.setattr(fast_paths, "_matmul_seconds", lambda dtype, size, repeats: timings[dtype])
    cpu_bf16_is_fast.cache_clear()
    yield timings
    cpu_bf16_is_fast.cache_clear()


def test_bf16_is_chosen_only_where_the_probe_says_it_is_faster(probe, monkeypatch):
    monkeypatch.setattr(fast_paths, "cpu_has_native_bf16", lambda: True)
    probe.update({torch.float32: 1.0, torch.bfloat16: 0.22})  # native bf16: 4.5x
    assert cpu_bf16_is_fast()
    cpu_bf16_is_fast.cache_clear()
    probe.update({torch.float32: 1.0, torch.bfloat16: 0.9})  # flags say bf16, but it is barely faster
    assert not cpu_bf16_is_fast()
    cpu_bf16_is_fast.cache_clear()
    monkeypatch.setattr(fast_paths, "cpu_has_native_bf16", lambda: False)
    probe.clear()  # no native bf16: no probe at all (a KeyError here would mean it timed something)
    assert not cpu_bf16_is_fast()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default")
def test_config_bf16_default_follows_the_probe_and_an_explicit_value_wins(tmp_path, monkeypatch):
    kw = dict(output_dir=str(tmp_path), report_to="none")
    monkeypatch.setattr(base, "cpu_bf16_is_fast", lambda: True)
    assert SFTConfig(**kw).bf16 is True
    assert SFTConfig(bf16="auto", **kw).bf16 is True
    assert SFTConfig(bf16=False, **kw).bf16 is False
    monkeypatch.setattr(base, "cpu_bf16_is_fast", lambda: False)
    assert SFTConfig(**kw).bf16 is False
    assert SFTConfig(bf16=True, **kw).bf16 is True


def test_this_cpu_gets_bf16_by_default_only_with_native_bf16(tmp_path):
    """Whatever VM runs the suite: the default agrees with its flags (AVX2-only: float32)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU default")
    config = SFTConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 == cpu_bf16_is_fast()
    if not cpu_has_native_bf16():
        assert config.bf16 is False


def test_the_switch_is_scoped_and_turns_every_fast_path_off(monkeypatch):
    assert fast_paths_enabled()
    big = torch.randn(4096, 256)
    monkeypatch.setattr(packed_linear, "_MAX_PACKED_ROWS", 1024)
    on = packed_linear.PackedLinear(big, 32)
    with cpu_fast_paths(False):
        assert not fast_paths_enabled()
        assert packed_linear.PackedLinear(big, 32).packed is None
        with cpu_fast_paths(True):
            assert fast_paths_enabled()
        assert not fast_paths_enabled()
    assert fast_paths_enabled()
    if packed_linear.onednn_linear_available():
        assert on.packed is not None


def test_kept_probability_pool_is_not_used_with_the_paths_off():
    logprobs.release_kept_buffers()
    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    labels = torch.randint(0, 500, (64,))
    with cpu_fast_paths(False):
        logps, _ = logprobs.selective_log_softmax(hidden, weight, labels, keep_logits=True)
        logps.sum().backward()
        assert logprobs._spare_probs == []
    logps, _ = logprobs.selective_log_softmax(hidden, weight, labels, keep_logits=True)
    logps.sum().backward()
    assert len(logprobs._spare_probs) == 1
    logprobs.release_kept_buffers()


def test_decode_loop_steps_on_the_hf_cache_with_the_paths_off(monkeypatch):
    """Same tokens either way (greedy), and the hand-written KV decode step is skipped when switched off."""
    class Greedy:
        def draw(self, input_ids, scores):
            return scores.argmax(-1)

    model, tok = build_tiny("nano", seed=0)
    ids = torch.tensor([tok("1 + 2 =").input_ids] * 2)
    mask = torch.ones_like(ids)
    used = []
    real = decode_loop.KVDecoder
    monkeypatch.setattr(decode_loop, "KVDecoder", lambda *a, **k: used.append(1) or real(*a, **k))

    def run():
        return decode_loop.decode(model, ids, mask, Greedy(), max_new_tokens=6, stop_token_ids=[tok.eos_token_id],
                                  pad_token_id=tok.pad_token_id)

    with torch.no_grad():
        fast = run()
        n_fast = len(used)
        with cpu_fast_paths(False):
            plain = run()
    assert n_fast == 1 and len(used) == 1  # the KV decoder was built for the first run only
    assert torch.equal(fast, plain)


def test_trainer_runs_inside_its_cpu_fast_paths_setting(tmp_path):
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, *a, **k):
            seen.append(fast_paths_enabled())

    data = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}] * 8)
    for flag in (False, True):
        config = SFTConfig(output_dir=str(tmp_path / str(flag)), max_steps=1, per_device_train_batch_size=4,
                           report_to="none", save_strategy="no", disable_tqdm=True, cpu_fast_paths=flag)
        SFTTrainer(model="tiny:nano", args=config, train_dataset=data, callbacks=[Probe()]).train()
    assert seen == [False, True]
    assert fast_paths_enabled()  # nothing left behind


def test_bf16_mixed_precision_logps_and_gradients_stay_close_to_float32():
    """bf16 autocast (what `bf16=True` runs on a CPU): the decoder's matmuls in bf16, the head and log-softmax
    in float32. Per-token log-probs within 0.1 nats of float32 and the gradient pointing the same way
    (cosine > 0.99): the tolerance the mixed-precision default is held to."""
    model, tok = build_tiny("small", seed=0)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog " * 3).input_ids])

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = token_logps(model, ids)
        loss = -out.logps[:, 1:].mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.logps[:, 1:].detach(), grads

    fp32_logps, fp32_grads = run(False)
    bf16_logps, bf16_grads = run(True)
    assert bf16_logps.dtype == torch.float32
    assert (bf16_logps - fp32_logps).abs().max() < 0.1
    assert torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0) > 0.99
