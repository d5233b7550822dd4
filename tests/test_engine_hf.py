"""The HF-generate rollout engine, the engine interface and the weight helpers (no vLLM needed)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from posttrain.models import build_tiny
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engine_factory import make_engine
from posttrain.online.engines import (OnlineEngineArgs, Rollout, RolloutEngine, SamplingParams, default_stop_token_ids,
                                      encode_prompts)
from posttrain.online.weights import chunk_weights, iter_merged_weights, weights_from_bytes, weights_to_bytes
from posttrain.ops import token_logps

PROMPTS = ["The cat sat on", [{"role": "user", "content": "What is 2 + 3?"}], [5, 17, 99, 4]]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("nano", seed=1)


def greedy(max_new_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **kw)


def test_shapes_grouping_and_prompt_forms(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    out = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, seed=0))
    assert len(out) == 9
    assert out.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected_ids = encode_prompts(tok, PROMPTS)
    assert out.prompt_ids == [expected_ids[i] for i in out.prompt_index]
    assert expected_ids[2] == [5, 17, 99, 4]
    chat = tok.apply_chat_template(PROMPTS[1], add_generation_prompt=True, tokenize=False)
    assert tok.decode(expected_ids[1]) == chat and chat.endswith("<|im_start|>assistant\n")
    for ids, lps, text in zip(out.completion_ids, out.logprobs, out.texts):
        assert 1 <= len(ids) <= 6 and len(lps) == len(ids)
        assert text == tok.decode(ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in lps)


def test_logprobs_match_trainer_temperature_scaled_logps(tiny):
    model, tok = tiny
    temperature = 0.7
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=7, seed=3)
    out = HFEngine(model, tok).generate(PROMPTS, params)
    for p, c, lps in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        ids = torch.tensor([p + c])
        ref = token_logps(model, ids, temperature=temperature).logps[0, len(p):]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)


def test_logprobs_with_top_k_are_the_truncated_sampling_distribution(tiny):
    model, tok = tiny
    temperature, k = 0.9, 5
    out = HFEngine(model, tok).generate(PROMPTS[:1], SamplingParams(n=4, temperature=temperature, top_k=k,
                                                                    max_new_tokens=6, seed=0))
    for p, c, lps in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1] / temperature
        kth = logits.topk(k, dim=-1).values[:, -1:]
        truncated = logits.masked_fill(logits < kth, float("-inf")).log_softmax(-1)
        ref = truncated.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)
        assert all(lp > -float("inf") for lp in lps)


def test_left_padding_and_chunking_do_not_change_greedy_results(tiny):
    model, tok = tiny
    prompts = [[7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12]]
    together = HFEngine(model, tok).generate(prompts, greedy())
    chunked = HFEngine(model, tok, max_batch_size=1).generate(prompts, greedy())
    assert together.completion_ids == chunked.completion_ids
    for p, c in zip(prompts, together.completion_ids):  # reference: plain greedy argmax, one prompt at a time
        ids = list(p)
        for _ in range(len(c)):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(p):] == c


def test_stop_tokens_end_completions_and_truncation_flags(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    base = engine.generate([[3, 4, 5]], greedy(10, stop_on_eos=False))
    assert base.truncated == [True] and len(base.completion_ids[0]) == 10
    stop = base.completion_ids[0][3]
    first = base.completion_ids[0].index(stop)
    out = engine.generate([[3, 4, 5]], greedy(10, stop_token_ids=[stop]))
    assert out.completion_ids[0] == base.completion_ids[0][:first + 1]  # stop token kept, nothing after
    assert out.truncated == [False] and len(out.logprobs[0]) == first + 1
    assert out.logprobs[0] == pytest.approx(base.logprobs[0][:first + 1], abs=1e-5)
    assert tok.eos_token_id in engine.stop_token_ids and tok.convert_tokens_to_ids("<|im_end|>") in engine.stop_token_ids


def test_eos_stops_generation(tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    old_head = model.get_output_embeddings()
    head = torch.nn.Linear(old_head.in_features, old_head.out_features, bias=True)
    with torch.no_grad():  # a head whose bias makes EOS the most likely token everywhere
        head.weight.copy_(old_head.weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 100.0
    model.lm_head = head
    out = HFEngine(model, tok).generate([[3, 4, 5], [6]], greedy(6))
    for ids, truncated in zip(out.completion_ids, out.truncated):
        assert ids[-1] == tok.eos_token_id and not truncated and ids.count(tok.eos_token_id) == 1
    no_stop = HFEngine(model, tok).generate([[3, 4, 5]], greedy(6, stop_on_eos=False))
    assert len(no_stop.completion_ids[0]) == 6


def test_seed_reproducible_and_samples_differ(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=11)
    rng_before = torch.random.get_rng_state()
    a, b = engine.generate(PROMPTS[:1], params), engine.generate(PROMPTS[:1], params)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert a.completion_ids == b.completion_ids
    assert len({tuple(c) for c in a.completion_ids}) > 1


def test_train_mode_restored_and_no_autograd_state(tiny):
    model, tok = tiny
    model = copy.deepcopy(model).train()
    out = HFEngine(model, tok).generate(PROMPTS[:1], greedy(4))
    assert model.training and len(out) == 1
    assert all(p.grad is None for p in model.parameters())


def _lora(model):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), cfg)


def test_peft_adapters_apply_and_merged_weights_equal_peft_merge(tiny):
    model, tok = tiny
    peft_model = _lora(model)
    merged_model = copy.deepcopy(peft_model).merge_and_unload()
    prompts = [[3, 4, 5], [9, 10]]
    with_adapters = HFEngine(peft_model, tok).generate(prompts, greedy(8))
    assert with_adapters.completion_ids == HFEngine(merged_model, tok).generate(prompts, greedy(8)).completion_ids
    assert with_adapters.completion_ids != HFEngine(model, tok).generate(prompts, greedy(8)).completion_ids
    merged = dict(iter_merged_weights(peft_model))
    reference = dict(merged_model.named_parameters())
    assert sorted(merged) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor.detach(), atol=1e-6, rtol=0)
    with peft_model.disable_adapter():  # disabled adapters: base weights
        for name, tensor in iter_merged_weights(peft_model):
            torch.testing.assert_close(tensor, model.get_parameter(name).detach())


def test_weights_chunking_keeps_layers_whole_and_round_trips(tiny):
    model, _ = tiny
    pairs = list(iter_merged_weights(model))
    chunks = list(chunk_weights(pairs, max_bytes=1))
    assert [n for c in chunks for n, _ in c] == [n for n, _ in pairs]
    layer_of = {}
    for i, chunk in enumerate(chunks):
        for name, _ in chunk:
            if ".layers." in name:
                layer = name.split(".layers.")[1].split(".")[0]
                assert layer_of.setdefault(layer, i) == i  # a decoder layer lives in exactly one chunk
    assert len(chunks) >= model.config.num_hidden_layers
    blob = weights_to_bytes(chunks[1])
    assert blob[8:9] == b"{"  # safetensors: 8-byte header length then a JSON header, no pickle
    back = weights_from_bytes(blob)
    for name, tensor in chunks[1]:
        assert torch.equal(back[name], tensor)


def test_make_engine_default_is_hf_and_sync_is_noop(tiny):
    model, tok = tiny
    engine = make_engine(OnlineEngineArgs(generation_max_batch_size=3), model, tok)
    assert isinstance(engine, HFEngine) and engine.samples_from_policy and engine.max_batch_size == 3
    assert engine.sync_weights(model) is False and engine.sync_count == 0


def test_sync_every_bookkeeping():
    class Recorder(RolloutEngine):
        def __init__(self):
            super().__init__(sync_every=3)
            self.pushed = 0

        def generate(self, prompts, params):
            return Rollout()

        def _push_weights(self, model):
            self.pushed += 1

    engine = Recorder()
    done = [engine.sync_weights(torch.nn.Linear(1, 1)) for _ in range(7)]
    assert done == [False, False, True, False, False, True, False] and engine.pushed == 2
    assert engine.sync_weights(torch.nn.Linear(1, 1), force=True) and engine.pushed == 3


@pytest.mark.parametrize("field,value", [("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                         ("min_p", 1.5), ("repetition_penalty", 0.0), ("max_new_tokens", 0)])
def test_sampling_params_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_bad_prompts_and_config_errors(tiny):
    _, tok = tiny
    with pytest.raises(TypeError, match="prompt 1"):
        encode_prompts(tok, ["ok", 3.5])
    with pytest.raises(ValueError, match="prompt 0: a conversation message needs 'role' and 'content'"):
        encode_prompts(tok, [[{"text": "hi"}]])
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        SamplingParams.from_dict({"temprature": 1.0})
    with pytest.raises(ValueError, match="vllm_mode='remote'"):
        OnlineEngineArgs(vllm_mode="remote")


def test_inverse_transform_sampler_matches_the_distribution_and_skips_masked_tokens():
    from posttrain.online.engine_hf import sample_inverse_cdf

    probs = torch.tensor([0.5, 0.0, 0.3, 0.0, 0.2])
    torch.manual_seed(0)
    tokens, totals = sample_inverse_cdf(3 * probs.expand(20000, -1))  # unnormalized weights
    assert torch.allclose(totals, torch.full_like(totals, 3.0))
    counts = torch.bincount(tokens, minlength=5).float() / 20000
    assert counts[1] == 0 and counts[3] == 0  # -inf log-probs (top-k/top-p masked) are never drawn
    assert torch.allclose(counts, probs, atol=0.015)



@pytest.mark.parametrize("vocab", [1024, 1000], ids=["whole-blocks", "padded-last-block"])
def test_two_level_sampler_matches_the_distribution_over_a_large_vocabulary(vocab):
    """Past two blocks the draw picks a 128-token block by its sum, then a token in it: the frequencies must
    still be the distribution's (chi-square), masked tokens are never drawn, and the last, padded block
    (a vocabulary that is not a multiple of 128) is reached."""
    from posttrain.online.engine_hf import sample_inverse_cdf

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(vocab, generator=g) ** 4  # uneven, some tokens far likelier than others
    weights[::3] = 0.0  # masked (top-k / top-p) tokens
    weights[-1] = 5.0  # the last token, in the last block
    torch.manual_seed(1)
    draws = 200_000
    tokens, totals = sample_inverse_cdf(weights.expand(draws, -1).contiguous())
    assert torch.allclose(totals, torch.full_like(totals, float(weights.sum())), rtol=1e-5)
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[weights == 0].sum() == 0 and counts[-1] > 0
    expected = weights.double() / weights.double().sum() * draws
    live = expected > 5
    chi2 = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
    dof = int(live.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5  # about 5 standard deviations above the mean of chi-square(dof)

def test_a_varlen_training_model_generates_on_sdpa_and_gets_varlen_back(tiny):
    from posttrain.ops.attention import VARLEN_ATTENTION, use_varlen_attention

    model, tok = tiny
    plain = HFEngine(model, tok).generate(["What is 1 + 2?\n"], greedy())
    varlen = copy.deepcopy(model)
    assert use_varlen_attention(varlen)
    seen = []
    hook = varlen.get_decoder().register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    out = HFEngine(varlen, tok).generate(["What is 1 + 2?\n"], greedy())
    hook.remove()
    assert set(seen) == {"sdpa"} and varlen.config._attn_implementation == VARLEN_ATTENTION
    assert out.completion_ids == plain.completion_ids


@pytest.mark.parametrize("params", [
    SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=9, seed=5),
    SamplingParams(n=2, temperature=1.2, top_k=20, min_p=0.01, repetition_penalty=1.3, max_new_tokens=7, seed=2),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, max_new_tokens=6),
], ids=["top_p", "top_k-min_p-repetition", "greedy-repetition"])
def test_decode_loop_matches_generate_token_for_token(tiny, params):
    """The engine's own decode loop and HF generate (same sampler, same seed) give the same completions and
    log-probs, with left padding, a stop token and every sampling transform."""
    model, tok = tiny
    prompts = [[7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11], PROMPTS[1]]
    base = HFEngine(model, tok, decode_loop=False).generate(prompts, params)
    stop = base.completion_ids[1][2]
    params = SamplingParams(**{**params.__dict__, "stop_token_ids": [stop]})
    loop = HFEngine(model, tok).generate(prompts, params)
    ref = HFEngine(model, tok, decode_loop=False).generate(prompts, params)
    assert loop.completion_ids == ref.completion_ids and loop.truncated == ref.truncated
    assert any(not t for t in loop.truncated)  # the stop token ended at least one completion
    for a, b in zip(loop.logprobs, ref.logprobs):
        assert a == pytest.approx(b, abs=1e-5)


def test_models_the_decode_loop_cannot_run_keep_generate(tiny):
    from posttrain.online.decode_loop import supports_decode_loop

    model, tok = tiny
    assert supports_decode_loop(model)
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0  # a head transform the loop does not apply
    assert not supports_decode_loop(capped)
    capped.config.final_logit_softcapping = None
    peft_head = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert not supports_decode_loop(peft_head)  # an adapter on the head: generate applies it
    out = HFEngine(peft_head, tok).generate(PROMPTS[:1], greedy(5))
    ref = HFEngine(peft_head, tok, decode_loop=False).generate(PROMPTS[:1], greedy(5))
    assert out.completion_ids == ref.completion_ids


def _tiny_arch(kind: str, tok):
    """A seeded tiny model of another decoder family (GQA, biases, q/k norms, sliding window)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    if kind in ("llama-gqa", "llama-lora"):
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, **common))
        if kind == "llama-lora":
            model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False))
        return model
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=32, **common))
    if kind == "mistral-window":
        return MistralForCausalLM(MistralConfig(sliding_window=4, **common))
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4,
                                      eos_token_id=tok.eos_token_id))


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("kind,kv_decoder", [("llama-gqa", True), ("llama-lora", True), ("qwen2", True),
                                             ("qwen3", True), ("mistral-window", False), ("gpt2", False)])
def test_decode_loop_on_each_decoder_family_matches_generate(tiny, kind, kv_decoder, packed, monkeypatch):
    """The preallocated-cache step (`KVDecoder`) reproduces generate on every family it claims (biases, GQA,
    Qwen3's q/k norms, LoRA on the projections); a sliding window shorter than the rollout, or another
    architecture, runs the HF decoder instead, with the same result. ``packed``: every plain projection and
    the head on oneDNN (thresholds at 0), as wide models get them."""
    from posttrain.online import decode_step
    from posttrain.ops import packed_linear

    if packed:
        assert packed_linear.onednn_linear_available()
        monkeypatch.setattr(packed_linear, "MIN_PACKED_ELEMENTS", 0)
        monkeypatch.setattr(packed_linear, "MIN_PACKED_PROJECTION_ELEMENTS", 0)
    _, tok = tiny
    model = _tiny_arch(kind, tok).float().eval()
    steps = []
    real_step = decode_step.KVDecoder.step
    monkeypatch.setattr(decode_step.KVDecoder, "step", lambda self, *a: steps.append(1) or real_step(self, *a))
    prompts = [[7, 8], [3, 4, 5, 6, 7, 8, 9, 10, 11], PROMPTS[1]]
    for params in (SamplingParams(n=2, temperature=0.9, top_p=0.95, max_new_tokens=10, seed=4), greedy(10)):
        loop = HFEngine(model, tok).generate(prompts, params)
        ref = HFEngine(model, tok, decode_loop=False).generate(prompts, params)
        assert loop.completion_ids == ref.completion_ids
        for a, b in zip(loop.logprobs, ref.logprobs):
            assert a == pytest.approx(b, abs=1e-4)
    assert bool(steps) == kv_decoder


def test_default_stop_token_ids_is_the_one_stop_rule(tiny, tmp_path):
    """EOS, then the generation config's EOS ids (a model object, or a checkpoint folder), then, when asked,
    the chat template's end-of-turn token; each once, in that order."""
    model, tok = tiny
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert default_stop_token_ids(tok) == [tok.eos_token_id]
    assert default_stop_token_ids(tok, model) == [tok.eos_token_id, im_end]  # tiny models stop on both
    assert default_stop_token_ids(tok, end_of_turn=True) == [tok.eos_token_id, im_end]
    model.save_pretrained(tmp_path / "ckpt")
    assert default_stop_token_ids(tok, str(tmp_path / "ckpt")) == [tok.eos_token_id, im_end]
    assert default_stop_token_ids(tok, str(tmp_path)) == [tok.eos_token_id]  # a folder without generation config
    assert HFEngine(model, tok).stop_token_ids == default_stop_token_ids(tok, model)
    plain = copy.copy(tok)
    plain.chat_template = None
    assert default_stop_token_ids(plain, end_of_turn=True) == [tok.eos_token_id]  # no template, no end of turn
