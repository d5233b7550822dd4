"""posttrain.models: tokenizer, tiny models, loading, PEFT helpers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from posttrain.models import (
    adapters_disabled,
    apply_peft,
    build_tiny,
    build_tokenizer,
    is_peft_model,
    load_model,
    load_tokenizer,
    merge_and_unload,
    parse_tiny_spec,
    unwrap_model,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_trains_deterministically_in_a_fresh_cache(tmp_path, monkeypatch, tok):
    # two empty caches: each call trains from scratch and must give the very same vocabulary and merges
    files = []
    for name in ("a", "b"):
        monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / name))
        fresh = build_tokenizer()
        assert fresh.get_vocab() == tok.get_vocab()
        (path,) = (tmp_path / name).glob("tokenizer-2048-*/tokenizer.json")
        files.append(json.loads(path.read_text())["model"])
        assert build_tokenizer().get_vocab() == tok.get_vocab()  # the cached copy loads back the same
    assert files[0] == files[1]


def test_tokenizer_size_and_special_tokens(tok):
    assert len(tok) == 2048
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2]
    # special tokens in text map to their single ids, and are never split
    enc = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert enc[0] == 1 and enc[-1] == 2
    assert tok.decode(enc, skip_special_tokens=True) == "user\nhi"


def test_digits_are_split_individually(tok):
    text = "What is 4720 + 85?"
    tokens = tok.convert_ids_to_tokens(tok(text)["input_ids"])
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == ["4", "7", "2", "0", "8", "5"]


def test_roundtrip_and_offsets(tok):
    text = "Hello, world! 12+9=21\n\tdef f(x): return x"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    # ASCII text: offsets tile the text exactly (byte-level BPE, offsets not trimmed)
    spans = enc["offset_mapping"]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert "".join(text[s:e] for s, e in spans) == text
    for (s, e), tid in zip(spans, enc["input_ids"]):
        assert tok.decode([tid]) == text[s:e]
    # multi-byte characters: several byte tokens share the character's span; decoding is still exact
    text = "café ✓ naïve"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    spans = enc["offset_mapping"]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(spans, spans[1:]))
    assert {i for s, e in spans for i in range(s, e)} == set(range(len(text)))


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Hello!<|im_end|>"


def test_save_load_round_trip(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template
    assert again.eos_token_id == tok.eos_token_id == again.pad_token_id
    assert load_tokenizer("tiny:small").get_vocab() == tok.get_vocab()


# ---- tiny models ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,hidden,layers,heads,vocab,tied", [
    ("nano", 64, 2, 1, 2048, True),
    ("small", 256, 4, 4, 2048, True),
    ("bench", 256, 4, 4, 32768, False),
])
def test_named_sizes(spec, hidden, layers, heads, vocab, tied):
    model, tok = build_tiny(spec)
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (hidden, layers, heads, vocab)
    assert c.head_dim == 64 and c.max_position_embeddings == 2048
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (heads * 64, hidden)
    assert c.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    assert model.dtype == torch.float32
    assert c.pad_token_id == c.eos_token_id == tok.eos_token_id
    assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert model.generation_config.pad_token_id == tok.pad_token_id
    if spec == "small":
        assert c.intermediate_size == 688


def test_key_value_spec():
    kw = parse_tiny_spec("hidden=128,layers=3,heads=2,kv_heads=1,intermediate=200,vocab=4096,max_pos=512,tie=0")
    assert kw["hidden_size"] == 128 and kw["num_hidden_layers"] == 3
    assert kw["num_attention_heads"] == 2 and kw["num_key_value_heads"] == 1 and kw["head_dim"] == 64
    assert kw["intermediate_size"] == 200 and kw["vocab_size"] == 4096
    assert kw["max_position_embeddings"] == 512 and kw["tie_word_embeddings"] is False
    assert parse_tiny_spec("nano,layers=3")["num_hidden_layers"] == 3
    assert parse_tiny_spec("hidden=256")["num_attention_heads"] == 4  # head_dim 64 by default
    model, _ = build_tiny("hidden=128,layers=1,heads=2,kv_heads=1,vocab=4096")
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 128)
    assert model.lm_head.weight.shape == (4096, 128)
    with pytest.raises(ValueError, match="unknown tiny spec key 'width'"):
        parse_tiny_spec("width=3")
    with pytest.raises(ValueError, match="unknown tiny size 'huge'"):
        parse_tiny_spec("huge")
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny("nano,vocab=100")


def test_seeding():
    a, _ = build_tiny("nano", seed=3)
    b, _ = build_tiny("nano", seed=3)
    c, _ = build_tiny("nano", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    # the global RNG is untouched
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    build_tiny("nano", seed=9)
    assert torch.equal(torch.rand(3), x)


def test_tiny_generates():
    model, tok = build_tiny("nano")
    enc = tok(["What is 1 + 2?\n"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 5


# ---- loading ----------------------------------------------------------------------------------

def test_load_model_from_saved_folder(tmp_path):
    model, tok = build_tiny("nano", seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.float32
    x = tok("What is 3 + 4?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
    assert load_model(str(tmp_path), dtype="bfloat16").dtype == torch.bfloat16
    rm = load_model(str(tmp_path), task="seq-cls", num_labels=1)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.pad_token_id == tok.pad_token_id
    assert load_model(model) is model


def test_tiny_heads_and_dtype():
    rm = load_model("tiny:nano", task="seq-cls")
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    assert rm.score.weight.shape == (1, 64) and rm.config.pad_token_id == 0
    # the seq-cls body has the same weights as the causal LM with the same seed
    lm = load_model("tiny:nano")
    assert torch.equal(rm.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    tc = load_model("tiny:nano", task="token-cls", num_labels=3, dtype=torch.bfloat16)
    assert type(tc).__name__ == "LlamaForTokenClassification" and tc.dtype == torch.bfloat16
    tok = load_tokenizer("tiny:nano")
    batch = tok(["a b c", "a"], return_tensors="pt", padding=True)
    assert rm(**batch).logits.shape == (2, 1)
    assert load_model("tiny:nano", seed=5).model.norm.weight.shape == (64,)
    with pytest.raises(ValueError, match="unknown task"):
        load_model("tiny:nano", task="seq2seq")


def test_load_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"not a folder.*tiny:small"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="tiny:small"):
        load_tokenizer("./no/such/dir")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    with pytest.raises(OSError, match=r"could not load model 'someorg/no-such-model' \(tried: .*tiny:small"):
        load_model("someorg/no-such-model")


# ---- PEFT -------------------------------------------------------------------------------------

def test_apply_peft_trains_only_adapters_and_disable_gives_base():
    model, tok = build_tiny("nano")
    x = tok("What is 2 + 2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(x).logits.clone()
    n_total = sum(p.numel() for p in model.parameters())
    peft_model = apply_peft(model, {"r": 4, "lora_alpha": 8})
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: q,k,v,o,gate,up,down in both layers, each A [4, in] + B [out, 4]
    assert len(trainable) == 2 * 7 * 2
    assert sum(p.numel() for p in trainable.values()) < 0.1 * n_total
    assert is_peft_model(peft_model) and not is_peft_model(build_tiny("nano")[0])

    # one optimizer step moves the adapters only, then the output differs from the base
    opt = torch.optim.SGD(trainable.values(), lr=0.5)
    frozen_before = peft_model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.clone()
    for _ in range(2):
        loss = peft_model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen_before, peft_model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight)
    with torch.no_grad():
        adapted = peft_model(x).logits
        with adapters_disabled(peft_model):
            ref = peft_model(x).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.allclose(ref, base, atol=1e-6)

    assert type(unwrap_model(peft_model)).__name__ == "LlamaForCausalLM"
    assert unwrap_model(peft_model, strip_peft=False) is peft_model
    merged = merge_and_unload(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, adapted, atol=1e-5)


def test_peft_errors_and_wrappers():
    model, _ = build_tiny("nano")
    with pytest.raises(ValueError, match="needs a PEFT model"):
        with adapters_disabled(model):
            pass
    with pytest.raises(TypeError, match="bad LoRA option"):
        apply_peft(model, {"r": 4, "not_an_option": 1})

    # stand-ins with the real wrappers' class names and attributes (DDP needs a process group,
    # torch.compile pulls in dynamo: both too slow to set up here)
    class DistributedDataParallel(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    class OptimizedModule(torch.nn.Module):
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    wrapped = DistributedDataParallel(OptimizedModule(model))
    assert unwrap_model(wrapped) is model


def test_one_unwrap_helper_sees_through_every_wrapper_and_keeps_peft_on_request():
    """`unwrap_model` / `is_peft_model` are the one helper (ops/wrappers.py) that ops, the engines, the weight
    sync and the trainers use: compile and parallel wrappers go, PEFT goes unless strip_peft=False."""
    from peft import LoraConfig

    import posttrain.ops as ops
    from posttrain.ops import wrappers

    assert unwrap_model is wrappers.unwrap_model is ops.unwrap_model and is_peft_model is wrappers.is_peft_model
    model, _ = build_tiny("nano")
    peft_model = apply_peft(model, LoraConfig(r=2, target_modules=["q_proj"]))

    class Parallel(torch.nn.Module):  # DDP / DeepSpeed / FSDP: the model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Compiled(torch.nn.Module):  # torch.compile's OptimizedModule
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    wrapped = Parallel(Compiled(peft_model))
    assert unwrap_model(wrapped) is peft_model.get_base_model() is model
    assert unwrap_model(wrapped, strip_peft=False) is peft_model
    assert is_peft_model(wrapped) and is_peft_model(peft_model)
    plain, _ = build_tiny("nano")
    assert unwrap_model(Parallel(plain), strip_peft=False) is plain and not is_peft_model(Parallel(plain))
    # a transformers model that carries a peft_config of its own (adapters loaded by transformers) is no
    # PeftModel: it is not unwrapped further (the old duck-typed check in online/weights.py said it was)
    plain.peft_config = {"default": object()}
    assert not is_peft_model(plain) and unwrap_model(plain) is plain


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                    reason="bitsandbytes is installed: its missing-package errors cannot occur")
def test_qlora_without_bitsandbytes_is_a_clear_error():
    from peft import LoraConfig

    model, _ = build_tiny("nano")
    with pytest.raises(ImportError, match="bitsandbytes"):
        apply_peft(model, {"r": 4, "load_in_4bit": True})
    config = LoraConfig(r=4, target_modules="all-linear")
    config.load_in_4bit = True  # how the CLI marks a QLoRA request on a config object
    with pytest.raises(ImportError, match="bitsandbytes"):
        apply_peft(model, config)
    with pytest.raises(ImportError, match="bitsandbytes"):
        load_model("tiny:nano", load_in_4bit=True)


def test_seq_cls_peft_keeps_score_trainable():
    rm = load_model("tiny:nano", task="seq-cls")
    peft_rm = apply_peft(rm, {"r": 2})
    names = [n for n, p in peft_rm.named_parameters() if p.requires_grad]
    assert any("score" in n for n in names) and any("lora_" in n for n in names)
