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
