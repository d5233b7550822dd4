"""Data habits of TRL users that used to give silent wrong results or fail (issue 26, items 2, 3, 4, 6 and the
SFT habits): a single EOS when a completion already ends with it, rows with nothing to train on dropped and
counted, tool schemas reaching the rendered text (as a list or as a JSON string), `formatting_func`,
`dataset_text_field`, pre-tokenized datasets, and the caller's tokenizer never modified."""
from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset

from posttrain import (
    BCOConfig, BCOTrainer, CPOConfig, CPOTrainer, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, ORPOConfig,
    ORPOTrainer, PRMConfig, PRMTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer,
)
from posttrain.data import DatasetFormatError, tokenize_prompt_completion, tokenize_text
from posttrain.models import build_tiny

COMMON = dict(per_device_train_batch_size=2, max_steps=1, logging_steps=1, report_to="none", save_strategy="no",
              disable_tqdm=True, seed=0)


def _args(config_cls, tmp_path, **kw):
    extra = {"ref_logps_cache_dir": str(tmp_path / "cache")} if config_cls in (DPOConfig, KTOConfig, BCOConfig) else {}
    return config_cls(output_dir=str(tmp_path / "out"), **{**COMMON, **extra, **kw})


@pytest.fixture
def tiny():
    return build_tiny("nano", seed=0)


# ------------------------------------------------------------------------------------ single EOS (item 8)
def test_tokenizer_level_eos_is_added_once(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    plain = tokenize_prompt_completion(tok, "Q: 1+1?", " 2")
    ended = tokenize_prompt_completion(tok, "Q: 1+1?", " 2" + tok.eos_token)
    assert ended == plain and plain["completion_ids"][-1] == eos and plain["completion_ids"].count(eos) == 1
    assert tokenize_prompt_completion(tok, "Q", "")["completion_ids"] == [eos]
    assert tokenize_text(tok, "hello" + tok.eos_token) == tokenize_text(tok, "hello")


def test_sft_prompt_completion_ending_with_eos_gets_one(tmp_path, tiny):
    model, tok = tiny
    data = Dataset.from_list([{"prompt": "Q: 1+1?", "completion": " 2" + tok.eos_token},
                              {"prompt": "Q: 2+2?", "completion": " 4"}])
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=data, processing_class=tok)
    for row in trainer.train_dataset:
        assert row["input_ids"][-1] == tok.eos_token_id and row["input_ids"].count(tok.eos_token_id) == 1
    assert trainer.train_dataset[0]["input_ids"][-2:] != [tok.eos_token_id] * 2


@pytest.mark.parametrize("trainer_cls,config_cls", [(DPOTrainer, DPOConfig), (CPOTrainer, CPOConfig),
                                                    (ORPOTrainer, ORPOConfig)])
def test_pair_completions_ending_with_eos_get_one(tmp_path, tiny, trainer_cls, config_cls):
    model, tok = tiny
    data = Dataset.from_list([{"prompt": "Q: 1+1?", "chosen": " 2" + tok.eos_token, "rejected": " 3" + tok.eos_token},
                              {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}])
    trainer = trainer_cls(model, args=_args(config_cls, tmp_path), train_dataset=data, processing_class=tok)
    for row in trainer.train_dataset:
        for key in ("chosen_ids", "rejected_ids"):
            assert row[key][-1] == tok.eos_token_id and row[key].count(tok.eos_token_id) == 1, key


@pytest.mark.parametrize("trainer_cls,config_cls", [(KTOTrainer, KTOConfig), (BCOTrainer, BCOConfig)])
def test_unpaired_completions_ending_with_eos_get_one(tmp_path, tiny, trainer_cls, config_cls):
    model, tok = tiny
    data = Dataset.from_list([{"prompt": "Q: 1+1?", "completion": " 2" + tok.eos_token, "label": True},
                              {"prompt": "Q: 2+2?", "completion": " 5" + tok.eos_token, "label": False}])
    trainer = trainer_cls(model, args=_args(config_cls, tmp_path), train_dataset=data, processing_class=tok)
    for row in trainer.train_dataset:
        assert row["completion_ids"][-1] == tok.eos_token_id and row["completion_ids"].count(tok.eos_token_id) == 1


def test_reward_completions_ending_with_eos_get_one(tmp_path, tiny):
    model, tok = tiny
    data = Dataset.from_list([{"prompt": "Q: 1+1?", "chosen": " 2" + tok.eos_token, "rejected": " 3"}])
    trainer = RewardTrainer(model, args=_args(RewardConfig, tmp_path), train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert row[key][-1] == tok.eos_token_id and row[key].count(tok.eos_token_id) == 1, key


# ------------------------------------------------------------------------ rows without loss (item 9)
def _only_user(i):
    return [{"role": "user", "content": f"hello {i}"}]


def _chat(i):
    return [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]


def test_sft_rows_without_assistant_turn_are_dropped_counted_and_reported(tmp_path, tiny, caplog):
    model, tok = tiny
    rows = [{"messages": _chat(0)}, {"messages": _only_user(1)}, {"messages": _chat(2)}, {"messages": _only_user(3)},
            {"messages": _chat(4)}]
    with caplog.at_level(logging.WARNING):
        trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, assistant_only_loss=True),
                             train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:2]),
                             processing_class=tok)
    assert len(trainer.train_dataset) == 3 and len(trainer.eval_dataset) == 1
    assert trainer._totals["data/train/empty_rows"] == 2 and trainer._totals["data/eval/empty_rows"] == 1
    assert "train: 2 of 5 rows have nothing to train on" in caplog.text and "rows 1, 3" in caplog.text
    assert all(any(r["completion_mask"][1:]) for r in trainer.train_dataset)  # no batch can be all empty
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0


def test_sft_prompt_longer_than_max_length_is_dropped_and_counted(tmp_path, tiny, caplog):
    model, tok = tiny
    rows = [{"prompt": "word " * 40, "completion": " long one"}, {"prompt": "Q: 1+1?", "completion": " 2"}]
    with caplog.at_level(logging.WARNING):
        trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, max_length=16),
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert len(trainer.train_dataset) == 1 and trainer._totals["data/train/empty_rows"] == 1
    assert trainer._totals["data/train/truncated_rows"] == 1
    assert "rows 0" in caplog.text
    assert trainer._totals["data/train/empty_rows"] == 1


def test_every_row_empty_is_an_error(tmp_path, tiny):
    model, tok = tiny
    rows = [{"messages": _only_user(0)}, {"messages": _only_user(1)}]
    with pytest.raises(ValueError, match="none of the 2 rows has a token to train on"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, assistant_only_loss=True),
                   train_dataset=Dataset.from_list(rows), processing_class=tok)


def test_preference_rows_with_no_scored_completion_token_are_dropped(tmp_path, tiny):
    model, tok = tiny
    # An empty prompt (this tokenizer has no BOS) before one-token completions: no token has a prediction.
    rows = [{"prompt": "", "chosen": "", "rejected": tok.eos_token}, {"prompt": "Q", "chosen": " a", "rejected": " b"}]
    trainer = DPOTrainer(model, args=_args(DPOConfig, tmp_path), train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    assert len(trainer.train_dataset) == 1 and trainer._totals["data/train/empty_rows"] == 1


def test_prm_rows_cut_before_their_first_step_are_dropped(tmp_path, tiny):
    model, tok = tiny
    rows = [{"prompt": "word " * 40, "completions": ["a.", "b."], "labels": [True, False]},
            {"prompt": "Q", "completions": ["a.", "b."], "labels": [True, False]}]
    trainer = PRMTrainer(model, args=_args(PRMConfig, tmp_path, max_length=16), train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    assert len(trainer.train_dataset) == 1 and trainer._totals["data/train/empty_rows"] == 1


# -------------------------------------------------------------------------------------- tools (item 6)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _decoded(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("as_json", [False, True], ids=["list", "json-string"])
def test_sft_prompt_completion_and_messages_render_tools(tmp_path, tiny, as_json):
    model, tok = tiny
    tools = json.dumps(TOOLS) if as_json else TOOLS
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    completion = [{"role": "assistant", "content": "Sunny."}]
    for row in ({"prompt": prompt, "completion": completion, "tools": tools},
                {"messages": prompt + completion, "tools": tools}):
        trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, chat_template="chatml"),
                             train_dataset=[row, row], processing_class=tok)
        text = _decoded(tok, trainer.train_dataset[0]["input_ids"])
        assert "# Tools" in text and '"name": "get_weather"' in text and "Weather in Paris?" in text
        assert text.index("get_weather") < text.index("Weather in Paris?")


def test_json_string_tools_give_the_same_tokens_as_the_list(tmp_path, tiny):
    model, tok = tiny
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    completion = [{"role": "assistant", "content": "Sunny."}]
    got = []
    for tools in (TOOLS, json.dumps(TOOLS)):
        trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, chat_template="chatml"),
                             train_dataset=[{"prompt": prompt, "completion": completion, "tools": tools}] * 2,
                             processing_class=tok)
        got.append(trainer.train_dataset[0])
    assert got[0] == got[1]


@pytest.mark.parametrize("as_json", [False, True], ids=["list", "json-string"])
def test_reward_dpo_and_kto_render_tools(tmp_path, tiny, as_json):
    model, tok = tiny
    tools = json.dumps(TOOLS) if as_json else TOOLS
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Sunny."}],
            "rejected": [{"role": "assistant", "content": "No idea."}], "tools": tools}
    unpaired = {"prompt": prompt, "completion": [{"role": "assistant", "content": "Sunny."}], "label": True,
                "tools": tools}
    reward = RewardTrainer(model, args=_args(RewardConfig, tmp_path, chat_template="chatml"), train_dataset=[pair] * 2,
                           processing_class=tok)
    dpo = DPOTrainer(model, args=_args(DPOConfig, tmp_path, chat_template="chatml"), train_dataset=[pair] * 2,
                     processing_class=tok)
    kto = KTOTrainer(model, args=_args(KTOConfig, tmp_path, chat_template="chatml"),
                     train_dataset=[unpaired, {**unpaired, "label": False}], processing_class=tok)
    for text in (_decoded(tok, reward.train_dataset[0]["chosen_input_ids"]),
                 _decoded(tok, reward.train_dataset[0]["rejected_input_ids"]),
                 _decoded(tok, dpo.train_dataset[0]["prompt_ids"]),
                 _decoded(tok, kto.train_dataset[0]["prompt_ids"])):
        assert "# Tools" in text and '"name": "get_weather"' in text


def test_bad_tools_value_fails_naming_the_row(tmp_path, tiny):
    model, tok = tiny
    prompt = [{"role": "user", "content": "hi"}]
    completion = [{"role": "assistant", "content": "yo"}]
    rows = [{"prompt": prompt, "completion": completion, "tools": json.dumps(TOOLS)},
            {"prompt": prompt, "completion": completion, "tools": "{not json"}]
    with pytest.raises(DatasetFormatError, match=r"row 1, field 'tools'"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=Dataset.from_list(rows),
                   processing_class=tok)


# ---------------------------------------------------------------------------------------- SFT habits
def test_formatting_func_makes_each_rows_text(tmp_path, tiny):
    model, tok = tiny
    data = Dataset.from_list([{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}])
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=data, processing_class=tok,
                         formatting_func=lambda row: f"Q: {row['question']}\nA: {row['answer']}")
    row = trainer.train_dataset[0]
    assert row["input_ids"] == tokenize_text(tok, "Q: 1+1?\nA: 2")["input_ids"]
    assert all(row["completion_mask"])
    trainer.train()


def test_formatting_func_must_return_a_string(tmp_path, tiny):
    model, tok = tiny
    data = Dataset.from_list([{"question": "1+1?"}, {"question": "2+2?"}])
    with pytest.raises(DatasetFormatError, match="row 0: formatting_func must return a string"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=data, processing_class=tok,
                   formatting_func=lambda row: [row["question"]])
    with pytest.raises(ValueError, match="completion_only_loss"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, completion_only_loss=True), train_dataset=data,
                   processing_class=tok, formatting_func=lambda row: row["question"])


def test_dataset_text_field_names_the_text_column(tmp_path, tiny):
    model, tok = tiny
    data = Dataset.from_list([{"content": "the real text", "text": "not this one", "id": 0},
                              {"content": "more text", "text": "nor this", "id": 1}])
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, dataset_text_field="content"),
                         train_dataset=data, processing_class=tok)
    assert trainer.train_dataset[0]["input_ids"] == tokenize_text(tok, "the real text")["input_ids"]
    trainer.train()
    with pytest.raises(DatasetFormatError, match="dataset_text_field='body' names no column"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, dataset_text_field="body"), train_dataset=data,
                   processing_class=tok)


def test_dataset_text_field_may_name_a_conversation_column(tmp_path, tiny):
    model, tok = tiny
    data = Dataset.from_list([{"conversation": _chat(0)}, {"conversation": _chat(1)}])
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, dataset_text_field="conversation",
                                                 assistant_only_loss=True), train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    assert tok.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]).startswith("1")


def test_pre_tokenized_dataset_is_used_as_is(tmp_path, tiny):
    model, tok = tiny
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [10, 11, 12], "completion_mask": [0, 1, 1]},
    ]
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    assert [dict(r) for r in trainer.train_dataset] == rows  # no re-tokenization, no EOS added
    trainer.train()
    full = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, completion_only_loss=False),
                      train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert full.train_dataset[0]["completion_mask"] == [1] * 5


def test_pre_tokenized_masks_padding_and_labels(tmp_path, tiny):
    model, tok = tiny
    rows = [
        {"input_ids": [5, 6, 7, 8, 0, 0], "attention_mask": [1, 1, 1, 1, 0, 0], "assistant_masks": [0, 1, 1, 1, 0, 0],
         "labels": [-100, 6, 7, -100, -100, -100]},
        {"input_ids": [10, 11, 12, 13, 14, 15], "attention_mask": [1] * 6, "assistant_masks": [0, 0, 1, 1, 1, 1],
         "labels": [10, 11, 12, 13, 14, 15]},
    ]
    trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, max_length=5),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.train_dataset[0] == {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 1, 1, 0]}
    assert trainer.train_dataset[1] == {"input_ids": [10, 11, 12, 13, 14], "completion_mask": [0, 0, 1, 1, 1]}
    assert trainer._totals["data/train/truncated_rows"] == 1
    bad = [{"input_ids": [5, 6, 7], "labels": [5, 9, 7]}]
    with pytest.raises(DatasetFormatError, match="'labels' differ from 'input_ids' at token 1"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=Dataset.from_list(bad),
                   processing_class=tok)


@pytest.mark.parametrize("bad,field", [({"input_ids": ["a", "b"]}, "input_ids"),
                                       ({"input_ids": [1, 2, 3], "completion_mask": [0, 1]}, "completion_mask"),
                                       ({"input_ids": [1, 2], "completion_mask": [0, 2]}, "completion_mask")])
def test_bad_pre_tokenized_row_fails_naming_row_and_field(tmp_path, tiny, bad, field):
    model, tok = tiny
    rows = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}, bad]
    with pytest.raises(DatasetFormatError, match=rf"row 1, field '{field}'"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=rows, processing_class=tok)


def test_formatting_func_is_ignored_for_a_pre_tokenized_dataset(tmp_path, tiny, caplog):
    model, tok = tiny
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    with caplog.at_level(logging.WARNING):
        trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=Dataset.from_list(rows),
                             processing_class=tok, formatting_func=lambda row: "never used")
    assert trainer.train_dataset[0]["input_ids"] == [5, 6, 7] and "formatting_func is not applied" in caplog.text


def test_assistant_only_loss_on_plain_text_is_an_error(tmp_path, tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="assistant_only_loss=True needs conversational data"):
        SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, assistant_only_loss=True),
                   train_dataset=Dataset.from_list([{"text": "a"}, {"text": "b"}]), processing_class=tok)


# ------------------------------------------------------------------------------- the caller's tokenizer
def test_tokenizer_without_template_is_copied_not_modified(tmp_path, tiny, caplog):
    model, tok = tiny
    tok.chat_template = None
    tok.pad_token = None
    data = Dataset.from_list([{"messages": _chat(0)}, {"messages": _chat(1)}])
    with caplog.at_level(logging.WARNING):
        trainer = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=data, processing_class=tok)
    assert tok.chat_template is None and tok.pad_token is None  # the caller's object is untouched
    assert trainer.processing_class is not tok and trainer.tokenizer.chat_template
    assert trainer.tokenizer.pad_token == tok.eos_token
    assert "no chat template" in caplog.text and "chatml" in caplog.text
    assert "<|im_start|>assistant" in tok.decode(trainer.train_dataset[0]["input_ids"])


def test_tokenizer_is_shared_when_nothing_changes_and_copied_for_a_named_template(tmp_path, tiny):
    model, tok = tiny
    own = tok.chat_template
    data = Dataset.from_list([{"text": "a"}, {"text": "b"}])
    same = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path), train_dataset=data, processing_class=tok)
    assert same.processing_class is tok
    other = SFTTrainer(model=model, args=_args(SFTConfig, tmp_path, chat_template="llama3"), train_dataset=data,
                       processing_class=tok)
    assert tok.chat_template == own and other.tokenizer.chat_template != own and other.processing_class is not tok
    assert len(other.tokenizer) == len(tok)
