"""Tiny vision-language models built offline from transformers' own classes, with their real processors.

`build_tiny_vlm("vlm")` gives a seeded `LlavaForConditionalGeneration` (a CLIP vision tower, a projector and a
Llama language model) with a `LlavaProcessor`; `build_tiny_vlm("vlm-idefics3")` an `Idefics3ForConditionalGeneration`
(SmolVLM's architecture: a pixel-shuffle connector, images framed by marker tokens, nested per-row images and a
`pixel_attention_mask`) with an `Idefics3Processor`. (Qwen2-VL's processor cannot be built here: it requires a
video processor, whose base class needs torchvision.) Both use the project
tokenizer with the image tokens added, and PIL image processors, so nothing needs torchvision or a hub. Why
two architectures: they differ in what the data pipeline must get right (bare image tokens vs image tokens
framed by markers, `pixel_values [N, C, H, W]` vs `[B, max images, C, H, W]` with a pixel mask, a flat vs a
per-row list of images for the image processor). `save_tiny_vlm` writes either as a folder that `AutoProcessor` and
`AutoModelForImageTextToText` load.

Also here: what the trainers ask of any VLM (`is_vlm`, `uses_mrope`, `freeze_vision`, `language_model_prefix`).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin

from .tokenizer import IM_END, build_tokenizer

__all__ = ["TINY_VLMS", "build_tiny_vlm", "freeze_vision", "is_vlm", "is_vlm_spec", "language_model_prefix",
           "save_tiny_vlm", "tiny_vlm_processor", "uses_mrope", "vision_modules"]

#: The tiny VLM specs (`tiny:<name>`) and their architecture.
TINY_VLMS: dict[str, str] = {"vlm": "llava", "vlm-llava": "llava", "vlm-idefics3": "idefics3"}

_HIDDEN, _LAYERS, _HEADS = 64, 2, 2


def is_vlm_spec(spec: str) -> bool:
    """True for a tiny spec that names a vision-language model (`vlm`, `vlm-idefics3`, ...)."""
    return spec.removeprefix("tiny:").split(",")[0].strip() in TINY_VLMS


def _llava(seed: int, with_model: bool = True) -> tuple[PreTrainedModel | None, ProcessorMixin]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_size, patch = 32, 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=_HIDDEN, intermediate_size=176,
                       num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_HEADS,
                       max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-6,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    config.pad_token_id = tokenizer.pad_token_id
    model = None
    if with_model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config).to(torch.float32)
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": image_size},
                                             crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    return model, processor


def _idefics3(seed: int, with_model: bool = True) -> tuple[PreTrainedModel | None, ProcessorMixin]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = copy.deepcopy(build_tokenizer())
    # Idefics3Processor adds <fake_token_around_image>, <image> and <end_of_utterance>; the row/column and
    # global-image tags it writes around each image are added here (one token each, as in SmolVLM).
    tags = ["<global-img>"] + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens({"additional_special_tokens": tags})
    image_size, patch, scale = 32, 8, 2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(image_size // patch) ** 2 // scale ** 2,
                                  chat_template=tokenizer.chat_template)
    tokenizer = processor.tokenizer
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=_HIDDEN, intermediate_size=176,
                num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, num_key_value_heads=_HEADS,
                max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=scale,
                            image_token_id=processor.image_token_id, tie_word_embeddings=False)
    config.pad_token_id = tokenizer.pad_token_id
    if not with_model:
        return None, processor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).to(torch.float32)
    return model, processor


def _builder(spec: str):
    name = spec.removeprefix("tiny:").split(",")[0].strip()
    if name not in TINY_VLMS:
        raise ValueError(f"unknown tiny VLM {spec!r}; expected one of {sorted(TINY_VLMS)}")
    return _llava if TINY_VLMS[name] == "llava" else _idefics3


def tiny_vlm_processor(spec: str = "vlm") -> ProcessorMixin:
    """The processor of the tiny VLM `spec` (what `build_tiny_vlm` returns beside the model), without the model."""
    return _builder(spec)(0, with_model=False)[1]


def build_tiny_vlm(spec: str = "vlm", seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A seeded float32 tiny VLM and its processor (`spec`: one of `TINY_VLMS`).

    Same spec and seed give the same weights; the global torch RNG is left untouched. The processor's tokenizer
    is the project tokenizer with the image tokens added (ChatML template), its image processor a PIL one.
    """
    model, processor = _builder(spec)(seed)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    model.eval()
    return model, processor


def save_tiny_vlm(spec: str, folder: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny VLM `spec` and its processor to `folder` (loadable by `AutoProcessor` and
    `AutoModelForImageTextToText`, hence by `load_model` / `load_processing_class`)."""
    model, processor = build_tiny_vlm(spec, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return os.fspath(folder)


# ------------------------------------------------------------------------------------ what trainers ask of a VLM
_VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
_PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector", "merger")


def is_vlm(model: nn.Module | Any) -> bool:
    """True when the model (or its config) is a vision-language model: its config has a `vision_config`."""
    config = getattr(model, "config", model)
    return getattr(config, "vision_config", None) is not None


def uses_mrope(model: nn.Module | Any) -> bool:
    """True when the model computes multi-axis (M-RoPE) position ids from the images itself (Qwen2-VL and its
    successors): 1-D per-sequence position ids of a padding-free batch would be wrong, so batches stay padded."""
    config = getattr(model, "config", model)
    text = getattr(config, "text_config", config)
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return isinstance(params, dict) and "mrope_section" in params


def vision_modules(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """`(vision tower modules, projector modules)` of a VLM, as `(qualified name, module)` pairs, outermost only.
    Qwen2-VL's projector (`merger`) lives inside its vision tower; it is listed as the projector."""
    towers, projectors = [], []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in _PROJECTOR_NAMES and not any(name.startswith(p + ".") for p, _ in projectors):
            projectors.append((name, module))
        elif last in _VISION_NAMES and not any(name.startswith(t + ".") for t, _ in towers):
            towers.append((name, module))
    return towers, projectors


def freeze_vision(model: nn.Module, tower: bool = True, projector: bool = False) -> int:
    """Stop gradients to the vision tower (`tower`) and/or the projector (`projector`); returns the number of
    parameters frozen. Raises if the model has no such module (asking to freeze what is not there is a mistake)."""
    towers, projectors = vision_modules(model)
    frozen = 0
    project_names = {n for n, _ in projectors}
    if tower:
        if not towers:
            raise ValueError(f"freeze_vision_tower: {type(model).__name__} has no vision tower "
                             f"(looked for modules named {list(_VISION_NAMES)})")
        for tname, module in towers:
            for pname, param in module.named_parameters():
                full = f"{tname}.{pname}"
                if any(full.startswith(p + ".") for p in project_names):
                    continue  # a projector inside the tower (Qwen2-VL's merger) follows `projector`
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += param.numel()
    if projector:
        if not projectors:
            raise ValueError(f"freeze_projector: {type(model).__name__} has no projector "
                             f"(looked for modules named {list(_PROJECTOR_NAMES)})")
        for _, module in projectors:
            for param in module.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += param.numel()
    return frozen


def language_model_prefix(model: nn.Module) -> str:
    """The qualified name of a VLM's language model (where LoRA adapters go): `model.language_model` (LLaVA,
    Qwen2-VL), `model.text_model` (Idefics3/SmolVLM)."""
    names = [name for name, _ in model.named_modules()]
    for wanted in _LANGUAGE_NAMES:
        found = next((n for n in names if n.rsplit(".", 1)[-1] == wanted), None)
        if found is not None:
            return found
    raise ValueError(f"{type(model).__name__} has no language model module (looked for {list(_LANGUAGE_NAMES)})")


_LANGUAGE_NAMES = ("language_model", "text_model")
