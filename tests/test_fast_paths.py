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
from posttrain.ops.divergences import chunked_divergence
from posttrain.ops.fast_paths import (cpu_bf16_is_fast, cpu_fast_paths, cpu_has_native_bf16, fast_paths_enabled,
                                      head_matmul_dtype, head_precision)
from posttrain.ops.logprobs import selective_log_softmax
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
    """bf16 autocast and bf16 head products (what `bf16=True` runs): the decoder's and the head's matmuls in bf16,
    the log-softmax in float32. Per-token log-probs within 0.1 nats of float32 and the gradient pointing the same way
    (cosine > 0.99): the tolerance the mixed-precision default is held to."""
    model, tok = build_tiny("small", seed=0)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog " * 3).input_ids])

    def run(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                head_precision(torch.bfloat16 if autocast else None):
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


def _head_case(seed: int = 0, rows: int = 96, hidden: int = 64, vocab: int = 3000):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.4).requires_grad_()  # logits of std ~3, as a LM's
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    return h, w, labels


@pytest.mark.parametrize("keep_logits", [True, False])
def test_head_precision_runs_the_head_products_in_bf16_and_the_softmax_in_float32(keep_logits):
    """Under head_precision(bf16) the log-probs are exactly those of bf16-rounded logits widened to float32 (the
    products ran in bf16, the softmax did not), within 0.1 nats of float32, and the gradients of the hidden
    states and the head point the way float32's do (cosine > 0.999), kept-probability and recompute paths alike."""
    def run(dtype):
        h, w, labels = _head_case()
        with head_precision(dtype):
            logps, ent = selective_log_softmax(h, w, labels, chunk_size=32, with_entropy=True,
                                               keep_logits=keep_logits)
        (logps.sum() + 0.1 * ent.sum()).backward()
        return logps.detach(), h.grad, w.grad

    h, w, labels = _head_case()
    with torch.no_grad():
        z = (h.bfloat16() @ w.bfloat16().T).float()
        reference = torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    fp32, g_h32, g_w32 = run(None)
    bf16, g_h16, g_w16 = run(torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, reference, atol=1e-4)
    assert 0 < (bf16 - fp32).abs().max() < 0.1
    for a, b in ((g_h16, g_h32), (g_w16, g_w32)):
        assert a.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    assert head_matmul_dtype() is None  # nothing left behind


def test_head_precision_applies_to_the_chunked_divergences():
    hs, ws, _ = _head_case(0)
    ht, wt, _ = _head_case(1)

    def run(dtype):
        for x in (hs, ws):
            x.grad = None
        with head_precision(dtype):
            div = chunked_divergence(hs, ws, ht.detach(), wt.detach(), kind="jsd", beta=0.5, chunk_size=32)
        div.sum().backward()
        return div.detach(), hs.grad.clone(), ws.grad.clone()

    fp32, gh32, gw32 = run(None)
    bf16, gh16, gw16 = run(torch.bfloat16)
    assert 0 < (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()
    for a, b in ((gh16, gh32), (gw16, gw32)):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="head_precision takes"):
        with head_precision(torch.float64):
            pass


@pytest.mark.parametrize("fields, expected", [({"bf16": True}, torch.bfloat16), ({"bf16": False}, None)])
def test_trainers_run_the_head_in_the_mixed_precision_dtype(tmp_path, fields, expected):
    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            seen.append(head_matmul_dtype())

    data = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}] * 4)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                       save_strategy="no", disable_tqdm=True, use_cpu=True, **fields)
    SFTTrainer(model="tiny:nano", args=config, train_dataset=data, callbacks=[Probe()]).train()
    assert seen == [expected]
    assert head_matmul_dtype() is None


def test_the_decode_loop_multiplies_in_bf16_under_mixed_precision():
    """The sampler sees float32 logits within bf16 rounding of the float32 run's (and not equal: bf16 ran)."""
    seen = {}

    class Record:
        def __init__(self, key):
            self.key = key

        def draw(self, input_ids, scores):
            seen.setdefault(self.key, scores.clone())
            return scores.argmax(-1)

    model, tok = build_tiny("nano", seed=0)
    ids = torch.tensor([tok("1 + 2 =").input_ids] * 2)
    with torch.no_grad():
        for key, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with head_precision(dtype):
                decode_loop.decode(model, ids, torch.ones_like(ids), Record(key), max_new_tokens=2,
                                   stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    assert seen["bf16"].dtype == torch.float32
    diff = (seen["bf16"] - seen["fp32"]).abs().max()
    assert 0 < diff < 0.05 * seen["fp32"].abs().max() + 0.05
