"""SFT on vision-language data: TRL's data shape through a real processor, exact masks over expanded image
tokens, per-batch pixel tensors, padded and padding-free batches, validation naming row and field."""

from __future__ import annotations

import datasets
import pytest
import torch
from PIL import Image

from posttrain.data import DatasetFormatError, ensure_chat_template, validate_dataset
from posttrain.data.vision import multimodal_token_ids, tokenize_vision_messages
from posttrain.models import build_tiny_vlm
from posttrain.models.vlm import tiny_vlm_processor, vision_modules
from posttrain.trainers.sft import SFTConfig, SFTTrainer

SPECS = ["vlm", "vlm-idefics3"]


def _img(colour, size=(16, 16)):
    return Image.new("RGB", size, colour)


def _rows():
    """0, 1 and 2 images per row, of different sizes."""
    return [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
         "images": [_img((255, 0, 0))]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}],
         "images": []},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                   {"type": "image"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "green blue"}]},
                      {"role": "user", "content": [{"type": "text", "text": "sure?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
         "images": [_img((0, 255, 0), (40, 24)), _img((0, 0, 255), (8, 30))]},
    ]


def _args(**kw):
    base = dict(output_dir="/tmp/posttrain-test-vlm", max_steps=6, per_device_train_batch_size=3,
                learning_rate=3e-3, logging_steps=1, report_to=[], disable_tqdm=True, save_strategy="no")
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.parametrize("template", ["chatml", "llama3", "zephyr"])
@pytest.mark.parametrize("spec", SPECS)
def test_assistant_masks_exact_over_image_tokens(spec, template):
    processor = tiny_vlm_processor(spec)
    ensure_chat_template(processor.tokenizer, template)
    tok = processor.tokenizer
    special = multimodal_token_ids(processor)
    row = _rows()[2]
    out = tokenize_vision_messages(processor, row["messages"], row["images"])
    ids, mask = out["input_ids"], out["assistant_mask"]
    trained = [i for i, m in zip(ids, mask) if m]
    # exactly the assistant turns with their end-of-turn markers, in order
    eot = tok.decode(tok(tok.apply_chat_template([{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": "\x01"}], tokenize=False)
                         .split("\x01")[1].rstrip(), add_special_tokens=False)["input_ids"])
    assert tok.decode(trained) == f"green blue{eot}yes{eot}"
    assert sum(out["image_mask"]) > 2 and not any(m for m, s in zip(mask, out["image_mask"]) if s)
    assert all((t in special) == bool(s) for t, s in zip(ids, out["image_mask"]))
    # the image tokens the model will replace: one run per image, as many as the model expects
    n_image = sum(t == processor.image_token_id for t in ids)
    assert n_image == 2 * (16 if spec == "vlm" else 4)


@pytest.mark.parametrize("spec", SPECS)
def test_completion_only_and_full_masks(spec):
    processor = tiny_vlm_processor(spec)
    tok = processor.tokenizer
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}]
    completion = [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    out = tokenize_vision_messages(processor, prompt + completion, [_img((255, 0, 0))], prompt_messages=1)
    assert tok.decode([i for i, m in zip(out["input_ids"], out["assistant_mask"]) if m]) == "red<|im_end|>"
    # full-sequence loss (SFT without assistant_only_loss): every token but the image ones
    m, _ = build_tiny_vlm(spec)
    trainer = SFTTrainer(m, args=_args(max_steps=1), train_dataset=_rows(), processing_class=processor)
    row = trainer.train_dataset[0]
    special = multimodal_token_ids(processor)
    assert row["completion_mask"] == [int(t not in special) for t in row["input_ids"]]


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_sft_trains_on_images(spec, padding_free):
    torch.set_num_threads(1)
    model, processor = build_tiny_vlm(spec)
    trainer = SFTTrainer(model, args=_args(padding_free=padding_free, assistant_only_loss=True),
                         train_dataset=_rows() * 2, processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert "pixel_values" in batch and batch["pixel_values"].shape[-1] == 32
    if spec == "vlm-idefics3":
        assert "pixel_attention_mask" in batch
    assert ("position_ids" in batch) == padding_free
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5


def test_padded_and_padding_free_agree():
    torch.set_num_threads(1)
    results = []
    for padding_free in (False, True):
        model, processor = build_tiny_vlm("vlm")
        trainer = SFTTrainer(model, args=_args(max_steps=2, padding_free=padding_free),
                             train_dataset=_rows(), processing_class=processor)
        trainer.train()
        results.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert results[0] == pytest.approx(results[1], abs=1e-4)


def test_freeze_vision_tower_option():
    torch.set_num_threads(1)
    model, processor = build_tiny_vlm("vlm")
    (tower_name, tower), = vision_modules(model)[0]
    (_, projector), = vision_modules(model)[1]
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    proj_before = {k: v.clone() for k, v in projector.state_dict().items()}
    trainer = SFTTrainer(model, args=_args(max_steps=2, freeze_vision_tower=True), train_dataset=_rows(),
                         processing_class=processor)
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert any(not torch.equal(proj_before[k], v) for k, v in projector.state_dict().items())


def test_tiny_vlm_by_name_and_plain_text_rows():
    """`tiny:vlm` loads the model and its processor by name; conversations without images train as before."""
    torch.set_num_threads(1)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}] * 3
    trainer = SFTTrainer("tiny:vlm", args=_args(max_steps=3), train_dataset=rows)
    assert trainer.processor is not None
    trainer.train()
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])))


def test_images_as_paths_and_datasets_image_feature(tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / "red.png"
    _img((255, 0, 0), (20, 20)).save(path)
    rows = _rows()[:1]
    ds = datasets.Dataset.from_dict({"messages": [rows[0]["messages"]] * 2, "images": [[str(path)]] * 2})
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    model, processor = build_tiny_vlm("vlm")
    trainer = SFTTrainer(model, args=_args(max_steps=1), train_dataset=ds, processing_class=processor)
    trainer.train()
    single = [{"messages": rows[0]["messages"], "image": str(path)}]
    assert validate_dataset(single).image_column == "image"


def _bad(change):
    rows = _rows()
    change(rows)
    return rows


@pytest.mark.parametrize("change, expected", [
    (lambda r: r[2].__setitem__("images", [_img((0, 0, 0)), "/no/such/image.png"]),
     "row 2, field 'images[1]': the image cannot be opened"),
    (lambda r: r[0].__setitem__("images", []), "row 0, field 'images': the row has 0 image(s) but its messages "
                                               "have 1"),
    (lambda r: r[1]["messages"][0]["content"].append({"type": "audio"}),
     "row 1, field 'messages[0].content[1].type': expected 'text' or 'image'"),
    (lambda r: r[1]["messages"][0]["content"].append({"type": "text", "text": 3}),
     "row 1, field 'messages[0].content[1].text'"),
])
def test_bad_image_rows_fail_before_training(change, expected):
    with pytest.raises(DatasetFormatError, match=expected.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        validate_dataset(_bad(change))
    model, processor = build_tiny_vlm("vlm")
    with pytest.raises(DatasetFormatError, match="row"):
        SFTTrainer(model, args=_args(), train_dataset=_bad(change), processing_class=processor)


def test_image_parts_without_image_column_and_tokenizer_only():
    rows = [{"messages": _rows()[0]["messages"]}]
    with pytest.raises(DatasetFormatError, match="row 0, field 'messages': the messages have image parts"):
        validate_dataset(rows)
    model, processor = build_tiny_vlm("vlm")
    with pytest.raises(ValueError, match="processing_class is a tokenizer"):
        SFTTrainer(model, args=_args(), train_dataset=_rows(), processing_class=processor.tokenizer)


def _tiny_qwen2_vl():
    """A tiny Qwen2-VL (M-RoPE) with its real processor. Test-only construction: Qwen2VLProcessor insists on a
    video processor, whose base class needs torchvision, so the class check is skipped for the image-only one."""
    import copy
    from unittest import mock

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    from posttrain.models import build_tokenizer

    tok = copy.deepcopy(build_tokenizer())
    names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": names})
    ids = dict(zip(names, tok.convert_tokens_to_ids(names)))
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                               size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                     chat_template=tok.chat_template)
    return model, processor


def test_qwen2_vl_mrope_trains_on_the_padded_path():
    torch.set_num_threads(1)
    model, processor = _tiny_qwen2_vl()
    trainer = SFTTrainer(model, args=_args(padding_free=True, assistant_only_loss=True), train_dataset=_rows() * 2,
                         processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert "position_ids" not in batch and {"image_grid_thw", "mm_token_type_ids"} <= set(batch)
    row = trainer.train_dataset[2]
    tok = processor.tokenizer
    assert tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m]) == \
        "green blue<|im_end|>yes<|im_end|>"
    # images of different sizes: a different number of image tokens each (one per merged 8x8-pixel patch)
    assert sum(t == processor.image_token_id for t in row["input_ids"]) == int(
        batch["image_grid_thw"][1:].prod(-1).sum()) // 4
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5


def test_lora_sft_on_a_vlm():
    torch.set_num_threads(1)
    model, processor = build_tiny_vlm("vlm")
    trainer = SFTTrainer(model, args=_args(max_steps=3, learning_rate=1e-2), train_dataset=_rows(),
                         processing_class=processor, peft_config={"r": 4, "lora_alpha": 8})
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("language_model" in n and "lora_" in n for n in trained)
    trainer.train()


def test_packing_with_images_is_refused():
    model, processor = build_tiny_vlm("vlm")
    with pytest.raises(ValueError, match="packing=True with images"):
        SFTTrainer(model, args=_args(packing=True, max_length=64), train_dataset=_rows(), processing_class=processor)


def test_images_column_typed_even_when_the_first_write_batch_has_none():
    """Arrow types a column from its first write batch (1000 rows): 1000 rows without an image then one with
    must still keep it."""
    from posttrain.data.vision import attach_images

    source = datasets.Dataset.from_dict({"images": [[]] * 1000 + [[_img((1, 2, 3))]]})
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 1001})
    out = attach_images(tokenized, source, "images")
    assert out[0]["images"] == [] and out[1000]["images"][0].size == (16, 16)


def test_prompt_completion_with_images_and_eval():
    """Conversational prompt-completion rows with images: the loss on the completion only; eval runs on images."""
    torch.set_num_threads(1)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
             "images": [_img(rgb, size)]}
            for c, rgb, size in [("red", (255, 0, 0), (16, 16)), ("blue", (0, 0, 255), (30, 20))]]
    model, processor = build_tiny_vlm("vlm-idefics3")
    trainer = SFTTrainer(model, args=_args(max_steps=2), train_dataset=rows, eval_dataset=rows,
                         processing_class=processor)
    tok = processor.tokenizer
    row = trainer.train_dataset[1]
    assert tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m]) == "blue<|im_end|>"
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_streamed_images_are_refused_clearly():
    rows = _rows()
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    model, processor = build_tiny_vlm("vlm")
    with pytest.raises(ValueError, match="streamed datasets with images are not supported yet"):
        SFTTrainer(model, args=_args(max_steps=1), train_dataset=stream, processing_class=processor)
