"""Tiny VLMs: built offline from transformers' own classes with their real processors, saved and loaded back
through the Auto classes, the chunked log-probs on their language model, freezing and LoRA placement."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from posttrain.data.vision import vision_inputs
from posttrain.models import build_tiny_vlm, freeze_vision, is_vlm, load_model, load_processing_class, save_tiny_vlm
from posttrain.models import apply_peft
from posttrain.models.vlm import language_model_prefix
from posttrain.ops import token_logps

SPECS = ["vlm", "vlm-idefics3"]


def _inputs(processor):
    token = processor.image_token
    images = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (40, 24), (0, 0, 255))]
    nested = type(processor.image_processor).__name__.startswith("Idefics")
    return processor(text=[f"a {token} b {token} c"], images=[images] if nested else images, return_tensors="pt")


@pytest.mark.parametrize("spec", SPECS)
def test_build_save_load_roundtrip(spec, tmp_path):
    torch.set_num_threads(1)
    model, processor = build_tiny_vlm(spec, seed=3)
    assert is_vlm(model) and processor.tokenizer.convert_tokens_to_ids(processor.image_token) == \
        model.config.image_token_id
    again, _ = build_tiny_vlm(spec, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    folder = save_tiny_vlm(spec, tmp_path / spec, seed=3)
    loaded = load_model(folder)  # a VLM config loads through AutoModelForImageTextToText
    assert type(loaded) is type(model)
    loaded_proc = load_processing_class(folder)
    assert type(loaded_proc) is type(processor)
    batch = _inputs(loaded_proc)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, loaded(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_tiny_spec_and_chunked_logps_match_logits(spec):
    torch.set_num_threads(1)
    model = load_model(f"tiny:{spec}")
    processor = load_processing_class(f"tiny:{spec}")
    assert is_vlm(model) and hasattr(processor, "image_processor")
    batch = _inputs(processor)
    with torch.no_grad():
        logits = model(**batch).logits.float()
        ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        out = token_logps(model, batch["input_ids"], batch["attention_mask"], **vision_inputs(batch))
    assert torch.allclose(out.logps[:, 1:], ref, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_freeze_and_lora_on_language_model_only(spec):
    model, _ = build_tiny_vlm(spec)
    lm = language_model_prefix(model)
    n = freeze_vision(model, tower=True, projector=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert n > 0 and trainable and all(name.startswith((lm + ".", "lm_head")) for name in trainable)
    model, _ = build_tiny_vlm(spec)
    peft_model = apply_peft(model, {"r": 4, "lora_alpha": 8})
    adapted = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert adapted and all(f"{lm}." in name for name in adapted)
