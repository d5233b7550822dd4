"""benchmarks/common.py: the shared benchmark harness."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ lives at the repo root, uninstalled
from benchmarks.common import (RssSampler, load_bench_model, lora_settings, make_chat_dataset, make_preference_chat_dataset, measure_matmul_peak,
                               model_flops_per_token, peak_rss_bytes, print_report, reset_peak_rss)


def test_model_flops_formula_matches_exact_linear_count():
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # per layer: q 64*64, k and v 64*32 each, o 64*64, MLP 3*64*96; head 300*64 (tied, still a matmul)
    n = 3 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 300 * 64
    assert linear == n
    assert model_flops_per_token(cfg, 128) == 6 * n + 12 * 3 * 64 * 128
    assert model_flops_per_token(model, 128) == 6 * n + 12 * 3 * 64 * 128
    assert model_flops_per_token(cfg, 128, training=False) == 2 * n + 4 * 3 * 64 * 128
    # LoRA: frozen base weights get no weight gradient, backward is the input gradient only
    assert model_flops_per_token(cfg, 128, frozen=True) == 4 * n + 12 * 3 * 64 * 128


def test_bench_models_and_the_lora_adapter_both_sides_train():
    model, tokenizer, description = load_bench_model("bench")
    assert model.config.vocab_size == 32768 and "tiny:bench" in description
    assert load_bench_model("tiny:nano")[2] == "tiny:nano"
    assert lora_settings(0) is None
    from peft import LoraConfig

    config = LoraConfig(**lora_settings(16))  # the peer builds the same object from the same dict
    assert (config.r, config.lora_alpha, config.target_modules) == (16, 32, "all-linear")


def test_matmul_peak_is_positive_and_timed():
    t0 = time.perf_counter()
    flops = measure_matmul_peak(size=128, seconds=0.3)
    assert 1e6 < flops < 1e14
    assert time.perf_counter() - t0 < 3


def test_peak_rss_sees_an_allocation_and_sampler_sees_children():
    assert reset_peak_rss()
    before = peak_rss_bytes()
    x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    assert peak_rss_bytes() - before > 48 * 2 ** 20
    del x
    code = "import time; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    with RssSampler(interval=0.02) as sampler:
        base = sampler.sample()
        proc = subprocess.Popen([sys.executable, "-c", code])
        proc.wait()
    assert sampler.peak_bytes - base > 70 * 2 ** 20


def test_chat_datasets_are_deterministic_and_within_bounds():
    a, b = make_chat_dataset(20, seed=3), make_chat_dataset(20, seed=3)
    assert a.to_list() == b.to_list() and a.to_list() != make_chat_dataset(20, seed=4).to_list()
    lengths = []
    for row in a:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert 5 <= len(user["content"].split()) <= 60
        lengths.append(len(assistant["content"].split()))
        assert 10 <= lengths[-1] <= 250
    assert len(set(lengths)) > 10  # variable length
    pref = make_preference_chat_dataset(5, seed=0, response_words=(3, 8))
    assert set(pref.column_names) == {"prompt", "chosen", "rejected"}
    for row in pref:
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert 3 <= len(row["rejected"][0]["content"].split()) <= 8


def test_print_report_formats_units():
    buf = io.StringIO()
    text = print_report({"tokens_per_s": 1234.5678, "peak_rss_bytes": 3 * 2 ** 30, "model_flops_per_s": 2.5e12,
                         "steps": 10000, "memory": {"chunked_bytes": 5 * 2 ** 20}}, title="sft", file=buf)
    assert buf.getvalue().rstrip("\n") == text
    assert "1235" in text and "3.00 GiB" in text and "2.5 TFLOP/s" in text and "10,000" in text
    assert "\n  chunked_bytes   | 5.00 MiB\n" in text
