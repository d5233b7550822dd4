"""Rollout-server request validation (no HTTP): every field typed and bounded, weight updates all-or-nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.models import build_tiny, tiny_config
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engines import SamplingParams
from posttrain.online.server import RolloutServer
from posttrain.online.server_requests import (ModelFacts, RequestError, ServerLimits, parse_generate, parse_json,
                                              parse_sampling)
from posttrain.online.weights import weights_to_bytes

VOCAB = 2048  # tiny:nano: tokenizer and embedding rows
CONTEXT = 2048


@pytest.fixture(scope="module")
def nano():
    return build_tiny("nano")


@pytest.fixture()
def app(nano):
    model, tok = nano
    return RolloutServer(HFEngine(copy.deepcopy(model), tok), backend="hf", model="tiny:nano",
                         limits=ServerLimits(max_prompts=8, max_n=4, max_new_tokens=100, max_total_tokens=1000))


def _parse(app, request):
    return parse_generate(request, limits=app.limits, facts=app.facts, tokenizer=app.tokenizer)


def test_model_facts_come_from_the_model(app, nano):
    model, _ = nano
    facts = app.facts
    assert (facts.vocab_size, facts.context_length, facts.whole_layers) == (VOCAB, CONTEXT, False)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert set(facts.weight_specs) == names and "lm_head.weight" in names  # the tied alias is accepted too
    assert facts.weight_specs["model.embed_tokens.weight"] == ((VOCAB, 64), torch.float32)
    # A vLLM backend started from a name has no HF model: the same specs come from the config, on meta.
    from_config = ModelFacts.from_model(None, config=tiny_config("nano"))
    assert from_config.weight_specs == facts.weight_specs and from_config.context_length == CONTEXT


def test_valid_requests_give_ids_and_params(app):
    ids, params = _parse(app, {"prompts": [[5, 17, 2047], "The cat", [{"role": "user", "content": "2 + 3?"}]],
                               "params": {"n": 2, "temperature": 0, "top_k": -1, "seed": 2**63 - 1,
                                          "max_new_tokens": 100, "stop_token_ids": [0, 2]}})
    assert ids[0] == [5, 17, 2047] and ids[1] == list(app.tokenizer("The cat")["input_ids"])
    assert len(ids[2]) > 5 and all(0 <= t < VOCAB for t in ids[2])
    assert params == SamplingParams(n=2, temperature=0.0, top_k=0, seed=2**63 - 1, max_new_tokens=100,
                                    stop_token_ids=[0, 2])
    assert _parse(app, {"prompts": [[1]]})[1] == SamplingParams(max_new_tokens=64)  # params are optional
    assert _parse(app, {"prompts": [[1]], "params": {"top_k": None}})[1].top_k == 0


@pytest.mark.parametrize("request_, message", [
    ([1, 2], r"expected a JSON object .*got a list"),
    ({"prompts": [[1]], "extra": 1}, r"unknown field\(s\) \['extra'\]"),
    ({"params": {}}, r"missing 'prompts'"),
    ({"prompts": []}, r"prompts: expected a non-empty list of prompts, got an empty list"),
    ({"prompts": {"a": 1}}, r"prompts: expected a non-empty list of prompts, got an object"),
    ({"prompts": [[1]] * 9}, r"9 prompts, more than the server's --max-prompts 8"),
    ({"prompts": [[1, -1]]}, r"prompts\[0\]\[1\]=-1: expected a token id, an integer in \[0, 2048\)"),
    ({"prompts": [[1], [2048]]}, r"prompts\[1\]\[0\]=2048: expected a token id, an integer in \[0, 2048\)"),
    ({"prompts": [[1.0]]}, r"prompts\[0\]\[0\]=1.0: expected a token id"),
    ({"prompts": [["1"]]}, r"prompts\[0\]\[0\]=a string: expected a token id"),
    ({"prompts": [[None]]}, r"prompts\[0\]\[0\]=null: expected a token id"),
    ({"prompts": [[True]]}, r"prompts\[0\]\[0\]=a boolean: expected a token id"),
    ({"prompts": [[10**400]]}, r"prompts\[0\]\[0\]=an integer: expected a token id"),
    ({"prompts": [[]]}, r"prompts\[0\] is empty"),
    ({"prompts": [""]}, r"prompts\[0\] is an empty string"),
    ({"prompts": [7]}, r"prompts\[0\]: expected a list of token ids, a string or a list of messages, got an integer"),
    ({"prompts": [[{"role": "user"}]]}, r"prompts\[0\]\[0\]\.content: a conversation message needs a string"),
    ({"prompts": [[1]], "params": []}, r"params: expected an object of sampling parameters, got a list"),
    ({"prompts": [[1]], "params": {"temprature": 1}}, r"unknown sampling parameter\(s\) \['temprature'\]"),
    ({"prompts": [[1]], "params": {"n": 0}}, r"params\.n=0: expected an integer in \[1, 4\] \(the server's --max-n\)"),
    ({"prompts": [[1]], "params": {"n": 5}}, r"params\.n=5: expected an integer in \[1, 4\]"),
    ({"prompts": [[1]], "params": {"n": 2.0}}, r"params\.n=2.0: expected an integer"),
    ({"prompts": [[1]], "params": {"n": True}}, r"params\.n=a boolean"),
    ({"prompts": [[1]], "params": {"max_new_tokens": 101}}, r"params\.max_new_tokens=101: expected an integer in "
                                                            r"\[1, 100\]"),
    ({"prompts": [[1]], "params": {"temperature": -0.1}}, r"params\.temperature=-0.1: expected a finite number >= 0"),
    ({"prompts": [[1]], "params": {"temperature": "hot"}}, r"params\.temperature=a string"),
    ({"prompts": [[1]], "params": {"temperature": 10**400}}, r"params\.temperature=an integer"),
    ({"prompts": [[1]], "params": {"top_p": 0}}, r"params\.top_p=0: expected a number in \(0, 1\]"),
    ({"prompts": [[1]], "params": {"top_p": 1.5}}, r"params\.top_p=1.5"),
    ({"prompts": [[1]], "params": {"top_k": -2}}, r"params\.top_k=-2: expected an integer >= 0 \(0, -1 or null: off\)"),
    ({"prompts": [[1]], "params": {"min_p": 2}}, r"params\.min_p=2: expected a number in \[0, 1\]"),
    ({"prompts": [[1]], "params": {"repetition_penalty": 0}}, r"params\.repetition_penalty=0"),
    ({"prompts": [[1]], "params": {"stop_on_eos": 1}}, r"params\.stop_on_eos: expected true or false, got an integer"),
    ({"prompts": [[1]], "params": {"seed": -1}}, r"params\.seed=-1: expected null or an integer in \[0, 2\*\*63 - 1\]"),
    ({"prompts": [[1]], "params": {"seed": 2**63}}, r"params\.seed="),
    ({"prompts": [[1]], "params": {"stop_token_ids": [5000]}}, r"params\.stop_token_ids\[0\]=5000"),
    ({"prompts": [[1]], "params": {"stop_token_ids": 3}}, r"params\.stop_token_ids: expected a list of token ids"),
])
def test_bad_requests_name_the_field_and_what_was_expected(app, request_, message):
    with pytest.raises(RequestError, match=message) as err:
        _parse(app, request_)
    assert err.value.status == 400


def test_token_limits_bound_prompts_and_totals(nano):
    model, tok = nano
    app = RolloutServer(HFEngine(model, tok), backend="hf", model="tiny:nano",
                        limits=ServerLimits(max_model_len=64, max_total_tokens=1000))
    assert app.limits.max_model_len == 64
    # The context bounds max_new_tokens (context - 1) and each prompt (context - max_new_tokens).
    with pytest.raises(RequestError, match=r"params\.max_new_tokens=64: expected an integer in \[1, 63\]"):
        _parse(app, {"prompts": [[1]], "params": {"max_new_tokens": 64}})
    ids, _ = _parse(app, {"prompts": [[1] * 54], "params": {"max_new_tokens": 10}})  # 54 + 10 = 64 fits
    assert len(ids[0]) == 54
    with pytest.raises(RequestError, match=r"prompts\[1\]: 55 token ids, more than the 54 allowed \(the context of 64 "
                                           r"tokens minus max_new_tokens=10\)"):
        _parse(app, {"prompts": [[1], [1] * 55], "params": {"max_new_tokens": 10}})
    # Total: n x sum(prompt + max_new_tokens) = 4 x ((50 + 10) x 4 + (30 + 10)) = 1120 > 1000.
    with pytest.raises(RequestError, match=r"5 prompts x n=4 x \(prompt tokens \+ max_new_tokens=10\) is 1120 tokens, "
                                           r"more than the server's --max-total-tokens 1000"):
        _parse(app, {"prompts": [[1] * 50] * 4 + [[1] * 30], "params": {"n": 4, "max_new_tokens": 10}})
    # A missing max_new_tokens takes SamplingParams' default (64), which is bounded too.
    small = RolloutServer(HFEngine(model, tok), backend="hf", model="tiny:nano", limits=ServerLimits(max_new_tokens=16))
    with pytest.raises(RequestError, match=r"params\.max_new_tokens is missing and its default 64 is over the server's "
                                           r"bound of 16: send max_new_tokens"):
        _parse(small, {"prompts": [[1]]})
    # Text is bounded after tokenization.
    with pytest.raises(RequestError, match=r"prompts\[0\] \(tokenized\): \d+ token ids, more than the 54 allowed"):
        _parse(app, {"prompts": ["the cat sat on the mat " * 20], "params": {"max_new_tokens": 10}})
    with pytest.raises(ValueError, match=r"max_model_len=4096 is beyond the model's context of 2048 tokens"):
        RolloutServer(HFEngine(model, tok), backend="hf", model="tiny:nano", limits=ServerLimits(max_model_len=4096))


def test_server_limits_reject_nonsense():
    with pytest.raises(ValueError, match=r"ServerLimits\.max_n=0: expected an integer >= 1"):
        ServerLimits(max_n=0)
    with pytest.raises(ValueError, match=r"ServerLimits\.request_timeout=0: expected a number > 0"):
        ServerLimits(request_timeout=0)
    with pytest.raises(ValueError, match=r"max_buffered_mb=1: expected at least the largest single body"):
        ServerLimits(max_buffered_mb=1, max_upload_mb=8)
    limits = ServerLimits(max_request_mb=2, max_upload_mb=8)
    assert (limits.max_request_bytes, limits.max_upload_bytes, limits.max_buffered_bytes) == (2**21, 2**23, 16 * 2**20)


@pytest.mark.parametrize("body, message", [
    (b"[1, 2", r"not valid JSON: Expecting"),
    (b"\xff\xfe[1]", r"not UTF-8 text"),
    (b"[" * 100_000, r"nested too deeply"),
    (b"1" * 5000, r"not valid JSON: Exceeds the limit \(4300 digits\)"),
    (b'{"temperature": NaN}', r"not valid JSON: NaN is not a JSON number"),
    (b"[-Infinity]", r"not valid JSON: -Infinity is not a JSON number"),
])
def test_json_bodies_are_strict(body, message):
    with pytest.raises(RequestError, match=message):
        parse_json(body, "POST /generate")
    assert parse_json(b"  ", "POST /reset") == {} and parse_json(b'{"a": [1]}', "x") == {"a": [1]}


def test_sampling_params_from_json_match_the_dataclass():
    params = parse_sampling({"n": 3, "temperature": 1, "top_p": 0.5, "min_p": 0.1, "repetition_penalty": 1.2,
                             "stop_on_eos": False, "seed": None}, vocab_size=10, max_n=8, max_new_tokens=100)
    assert params == SamplingParams(n=3, temperature=1.0, top_p=0.5, min_p=0.1, repetition_penalty=1.2,
                                    stop_on_eos=False)
    assert isinstance(params.temperature, float)


# ---- weight updates ----------------------------------------------------------------------------------

def _params(app):
    return {n: p.detach().clone() for n, p in app.engine.model.named_parameters()}


def _blob(*pairs):
    return weights_to_bytes(list(pairs))


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("bad, message", [
    (("model.nope.weight", torch.zeros(2)), r"weight 'model.nope.weight' is not a parameter of the served model"),
    (("model.norm.weight", torch.zeros(3)), r"'model.norm.weight': shape \(3,\) does not match the model's \(64,\)"),
    (("model.norm.weight", torch.zeros(64, dtype=torch.int32)),
     r"'model.norm.weight' has dtype 'I32': expected a floating-point dtype \(the model's is torch.float32\)"),
    (("model.norm.weight", torch.full((64,), float("nan"))), r"'model.norm.weight' holds NaN or infinite values"),
])
def test_bad_weight_updates_apply_nothing(app, bad, message):
    """A valid, different tensor comes first in the same update: it must not be applied either."""
    before = _params(app)
    with pytest.raises(RequestError, match=message) as err:
        app.update_weights(_blob((UP, torch.ones_like(before[UP])), bad))
    assert err.value.status == 400
    after = _params(app)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("body, message", [
    (b"\x80\x04pickle?", r"expected a safetensors blob: its header size \d+ is beyond the 9-byte body"),
    (b"", r"expected a safetensors blob .* got 0 bytes"),
    ((8).to_bytes(8, "little") + b'{"a": 1}', r"weight 'a': expected a header entry with 'dtype', 'shape'"),
    ((2).to_bytes(8, "little") + b"{}", r"the blob holds no tensors"),
    ((2).to_bytes(8, "little") + b"[]", r"its header is not a JSON object"),
    ((3).to_bytes(8, "little") + b"{\xff}", r"its header is not valid JSON"),
    # a well-formed header whose tensor bytes are missing: safetensors' own check
    ((len(h := b'{"model.norm.weight":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}')).to_bytes(8, "little")
     + h + b"\0" * 10, r"expected a safetensors blob: "),
])
def test_malformed_weight_blobs_are_refused(app, body, message):
    before = _params(app)
    with pytest.raises(RequestError, match=message):
        app.update_weights(body)
    assert all(torch.equal(before[n], p) for n, p in _params(app).items())


def test_valid_weight_update_applies_and_casts(app):
    shape = app.engine.model.get_parameter(UP).shape
    up = torch.randn(shape, dtype=torch.bfloat16)
    assert app.update_weights(_blob((UP, up), ("lm_head.weight", torch.zeros(VOCAB, 64)))) == {"loaded": 2}
    model = app.engine.model
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, up.float(), rtol=0, atol=0)
    assert torch.count_nonzero(model.model.embed_tokens.weight) == 0  # lm_head is tied to the embedding


def test_whole_layer_backends_refuse_a_split_layer(app):
    facts = copy.copy(app.facts)
    facts.whole_layers = True  # as for the vLLM backend
    app.facts = facts
    with pytest.raises(RequestError, match=r"layer 'model.layers.0' is incomplete \(missing \['model.layers.0.input_"
                                           r"layernorm.weight'"):
        app.update_weights(_blob((UP, torch.ones(app.engine.model.get_parameter(UP).shape))))
    layer = [(n, p.detach().clone()) for n, p in app.engine.model.named_parameters() if n.startswith("model.layers.0.")]
    assert app.update_weights(_blob(*layer)) == {"loaded": len(layer)}
    assert app.update_weights(_blob(("model.norm.weight", torch.ones(64)))) == {"loaded": 1}  # not a decoder layer


def test_vllm_backend_facts_come_from_its_checkpoint_and_engine(nano, tmp_path):
    """The vLLM engine holds no HF model: names and shapes come from its folder's config (built on the meta
    device), the context from vLLM's max_model_len, and layers must come whole (no vLLM needed here)."""
    from types import SimpleNamespace

    model, tok = nano
    model.save_pretrained(tmp_path)
    vllm = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=512)))
    engine = SimpleNamespace(tokenizer=tok, model_path=str(tmp_path), llm=vllm)
    facts = ModelFacts.from_engine(engine, "vllm")
    assert (facts.vocab_size, facts.context_length, facts.whole_layers) == (VOCAB, 512, True)
    assert facts.weight_specs == ModelFacts.from_model(model).weight_specs


def test_serve_flags_out_of_range_exit_with_the_reason():
    from posttrain.online.server import serve_main

    with pytest.raises(SystemExit, match=r"ServerLimits\.max_n=0: expected an integer >= 1"):
        serve_main(["--model", "tiny:nano", "--backend", "hf", "--port", "0", "--max-n", "0"])
    with pytest.raises(SystemExit, match=r"max_model_len=4096 is beyond the model's context of 2048 tokens"):
        serve_main(["--model", "tiny:nano", "--backend", "hf", "--port", "0", "--max-model-len", "4096"])
