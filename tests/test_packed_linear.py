"""posttrain.ops.packed_linear: the oneDNN-packed head, and the log-softmax and decode loop on it."""

from __future__ import annotations

import pytest
import torch

from posttrain.ops import packed_linear, selective_log_softmax_ext
from posttrain.ops.fast_paths import cpu_fast_paths
from posttrain.ops.packed_linear import PackedLinear, onednn_linear_available

from test_ops import make, written_out

ONEDNN = torch.backends.mkldnn.is_available()


def test_onednn_path_is_found_on_this_build():
    """x86 CPU builds of PyTorch ship oneDNN: the packed path must be found there, not silently skipped."""
    assert onednn_linear_available() == ONEDNN


@pytest.mark.parametrize("rows", [1, 32, 77])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_product_matches_mm(rows, with_bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4096, 256, generator=g)  # 1M elements: packed
    bias = torch.randn(4096, generator=g) if with_bias else None
    head = PackedLinear(weight, 32, bias)  # packed for 32 rows, also used with other block sizes
    assert (head.packed is not None) == ONEDNN
    hidden = torch.randn(rows, 256, generator=g)
    want = hidden.double() @ weight.double().T + (bias.double() if with_bias else 0)
    got = head(hidden)
    assert got.dtype == torch.float32 and got.shape == (rows, 4096)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=2e-4)


def test_small_float64_and_switched_off_weights_are_not_packed(monkeypatch):
    assert PackedLinear(torch.randn(50, 8), 32).packed is None  # below MIN_PACKED_ELEMENTS
    assert PackedLinear(torch.randn(4096, 256, dtype=torch.float64), 32).packed is None
    big = torch.randn(4096, 256)
    assert PackedLinear(big, 4096).packed is None  # large row blocks stay on MKL
    out = torch.empty(3, 50)
    small = PackedLinear(torch.randn(50, 8), 3)
    assert small(torch.randn(3, 8), out=out).data_ptr() == out.data_ptr()  # the plain path fills `out`
    with cpu_fast_paths(False):  # the config field cpu_fast_paths=False
        assert PackedLinear(big, 32).packed is None


@pytest.mark.parametrize("keep_logits", [False, True], ids=["recompute", "kept"])
def test_log_softmax_on_the_packed_head_matches_full_logits(keep_logits, monkeypatch):
    """Forward chunks (and backward's recomputed chunks) on the packed head: values and all gradients."""
    monkeypatch.setattr(packed_linear, "MIN_PACKED_ELEMENTS", 0)
    calls = []
    real_call = PackedLinear.__call__
    monkeypatch.setattr(PackedLinear, "__call__",
                        lambda self, *a, **k: calls.append(self.packed is not None) or real_call(self, *a, **k))
    hidden, weight, bias, labels = make(n=41, h=16, v=300, dtype=torch.float32)
    logp, ent, top = selective_log_softmax_ext(hidden, weight, labels, bias=bias, temperature=0.8, chunk_size=8,
                                               with_entropy=True, with_argmax=True, keep_logits=keep_logits)
    ref_logp, ref_ent = written_out(hidden, weight, labels, bias, 0.8)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(ent.double(), ref_ent, atol=2e-4, rtol=2e-4)
    assert torch.equal(top, ((hidden @ weight.T + bias) / 0.8).argmax(-1))
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(41, generator=g), torch.randn(41, generator=g)
    grads = torch.autograd.grad((logp * w_lp).sum() + (ent * w_ent).sum(), (hidden, weight, bias))
    ref = torch.autograd.grad((ref_logp * w_lp.double()).sum() + (ref_ent * w_ent.double()).sum(),
                              (hidden, weight, bias))
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got.double(), want.double(), atol=2e-3, rtol=2e-3)
    chunks = 6 if keep_logits else 12  # forward's 6 chunks, and backward's 6 recomputed ones
    assert len(calls) == chunks and all(calls) == ONEDNN


def test_decode_loop_on_packed_head_and_projections_matches_generate(monkeypatch):
    """The HF engine's decode loop with its head and the decoder's projections on oneDNN gives generate's
    tokens and log-probs."""
    from posttrain.models import build_tiny
    from posttrain.online.engine_hf import HFEngine
    from posttrain.online.engines import SamplingParams

    monkeypatch.setattr(packed_linear, "MIN_PACKED_ELEMENTS", 0)
    monkeypatch.setattr(packed_linear, "MIN_PACKED_PROJECTION_ELEMENTS", 0)
    packed = []
    real_init = PackedLinear.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        packed.append(self.packed is not None)

    monkeypatch.setattr(PackedLinear, "__init__", spy)
    model, tok = build_tiny("nano", seed=1)
    prompts = [[7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    for params in (SamplingParams(n=3, temperature=0.9, top_p=0.95, max_new_tokens=10, seed=4),
                   SamplingParams(temperature=0.0, max_new_tokens=8)):
        loop = HFEngine(model, tok).generate(prompts, params)
        ref = HFEngine(model, tok, decode_loop=False).generate(prompts, params)
        assert loop.completion_ids == ref.completion_ids
        for a, b in zip(loop.logprobs, ref.logprobs):
            assert a == pytest.approx(b, abs=1e-4)
    # per rollout: the head, then 7 projections in each of the 2 layers
    assert len(packed) == 2 * (1 + 2 * 7) and all(packed) == ONEDNN


def test_decode_loop_packs_plain_projections_and_keeps_lora_layers(monkeypatch):
    """With LoRA on q/v/down, those run through PEFT's layers while k/o/gate/up are packed; the rollout
    equals the merged model's (every projection packed) and differs from the base model's."""
    import copy

    from peft import LoraConfig, get_peft_model

    from posttrain.models import build_tiny
    from posttrain.online.engine_hf import HFEngine
    from posttrain.online.engines import SamplingParams

    monkeypatch.setattr(packed_linear, "MIN_PACKED_ELEMENTS", 0)
    monkeypatch.setattr(packed_linear, "MIN_PACKED_PROJECTION_ELEMENTS", 0)
    shapes = []
    real_init = PackedLinear.__init__

    def spy(self, weight, *args, **kwargs):
        real_init(self, weight, *args, **kwargs)
        shapes.append(tuple(weight.shape))

    monkeypatch.setattr(PackedLinear, "__init__", spy)
    model, tok = build_tiny("nano", seed=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompts = [[7, 8], [3, 4, 5, 6]]
    with_adapters = HFEngine(peft_model, tok).generate(prompts, params)
    assert len(shapes) == 1 + 2 * 4  # the head, then k, o, gate and up of each layer; not q, v or down
    assert with_adapters.completion_ids == HFEngine(merged, tok).generate(prompts, params).completion_ids
    assert with_adapters.completion_ids != HFEngine(model, tok).generate(prompts, params).completion_ids
    for a, b in zip(with_adapters.logprobs, HFEngine(merged, tok).generate(prompts, params).logprobs):
        assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_distillation_divergence_on_packed_heads_matches_full_logits(kind, monkeypatch):
    """Both models' heads packed: the chunked divergence's values and gradients (student and teacher)."""
    from posttrain.ops import chunked_divergence

    from test_ops_divergences import make as make_pair
    from test_ops_divergences import written_out as divergence_written_out

    monkeypatch.setattr(packed_linear, "MIN_PACKED_ELEMENTS", 0)
    inputs = [x.detach().float().requires_grad_() for x in make_pair(v=200)]
    hs, ws, bs, ht, wt, bt = inputs
    got = chunked_divergence(hs, ws, ht, wt, kind=kind, student_bias=bs, teacher_bias=bt, temperature=1.5,
                             chunk_size=6)
    double = [x.detach().double().requires_grad_() for x in inputs]
    dhs, dws, dbs, dht, dwt, dbt = double
    want = divergence_written_out((dhs @ dws.T + dbs) / 1.5, (dht @ dwt.T + dbt) / 1.5, kind, 0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for g1, g2 in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), double)):
        torch.testing.assert_close(g1.double(), g2, atol=1e-4, rtol=1e-3)
