"""RewardModelScorer: a trained reward model (outcome or process) as a batched reward function."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import PRMConfig, PRMTrainer, RewardConfig, RewardTrainer
from posttrain.data import ensure_chat_template
from posttrain.losses import aggregate_step_scores
from posttrain.models import load_model, load_tokenizer
from posttrain.online.rewards.reward_model import RewardModelScorer, score_steps
from posttrain.tasks import ArithmeticTask


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-3, max_steps=3,
                save_strategy="no", report_to="none", disable_tqdm=True, seed=0, max_length=96, logging_steps=1)
    base.update(kw)
    return cls(**base)


def _train_and_save(tmp, trainer_cls, config_cls, data, name):
    """A reward model trained a few steps (so its head is no longer the init), saved like the CLI saves it."""
    trainer = trainer_cls("tiny:nano", args=_args(config_cls, tmp), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp / name))
    trainer.tokenizer.save_pretrained(str(tmp / name))
    return tmp / name, trainer


@pytest.fixture(scope="module")
def outcome_dir(tmp_path_factory):
    data = ArithmeticTask(digits=2, seed=0).preference(32)
    return _train_and_save(tmp_path_factory.mktemp("rm"), RewardTrainer, RewardConfig, data, "rm")


@pytest.fixture(scope="module")
def process_dir(tmp_path_factory):
    data = ArithmeticTask(digits=2, seed=0).stepwise(32)
    return _train_and_save(tmp_path_factory.mktemp("prm"), PRMTrainer, PRMConfig, data, "prm")


def _completions():
    task = ArithmeticTask(digits=2, seed=1)
    pc = task.preference(6)
    return list(pc["prompt"]) * 2, list(pc["chosen"]) + list(pc["rejected"])


def test_saved_and_reloaded_reward_model_scores_identically(outcome_dir):
    path, trainer = outcome_dir
    prompts, completions = _completions()
    in_memory = RewardModelScorer(trainer.model, trainer.tokenizer)(prompts, completions)
    reloaded = RewardModelScorer(str(path))
    assert reloaded.__name__ == "rm"
    scores = reloaded(prompts, completions, completion_ids=None, answer=["0"] * len(prompts))
    assert len(scores) == len(completions) and all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(in_memory, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) > 1  # a real head, not a constant
    # the reloaded head is the trained one, not re-initialized by loading
    head = trainer.model.score.weight.detach()
    assert torch.equal(reloaded.model.score.weight.detach(), head)


def test_batching_does_not_change_scores(outcome_dir):
    path, _ = outcome_dir
    prompts, completions = _completions()
    one = RewardModelScorer(str(path), batch_size=1)(prompts, completions)
    many = RewardModelScorer(str(path), batch_size=5)(prompts, completions)
    assert many == pytest.approx(one, abs=1e-5)


def test_conversations_use_the_reward_models_own_template(outcome_dir):
    path, _ = outcome_dir
    scorer = RewardModelScorer(str(path))
    prompt = [{"role": "user", "content": "What is 12 + 30?"}]
    completion = [{"role": "assistant", "content": "2+0=2, write 2 carry 0. 1+3=4, write 4 carry 0. <answer>42</answer>"}]
    got = scorer([prompt], [completion])[0]
    # by hand: the reward tokenizer's (chatml) rendering of the whole conversation, one forward
    tok = load_tokenizer(str(path))
    text = tok.apply_chat_template(prompt + completion, tokenize=False).rstrip()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert got == pytest.approx(expected, abs=1e-5)
    # a string completion after a conversational prompt is the assistant's turn
    assert scorer([prompt], [completion[0]["content"]])[0] == pytest.approx(got, abs=1e-6)
    # another template changes the text the model sees, hence the score
    other = RewardModelScorer(str(path), chat_template="zephyr")
    assert other([prompt], [completion])[0] != pytest.approx(got, abs=1e-6)


def test_process_scorer_aggregates_step_scores(process_dir):
    path, trainer = process_dir
    prompt = "What is 47 + 85?\n"
    steps = ["7+5=12, write 2 carry 1.", "4+8+1=13, write 3 carry 1.", "<answer>132</answer>"]
    per_step = score_steps(trainer.model, trainer.tokenizer, prompt, steps)
    assert len(per_step) == 3 and all(0.0 < p < 1.0 for p in per_step)
    text = "\n".join(steps)
    for method in ("min", "product", "last"):
        scorer = RewardModelScorer(str(path), kind="process", aggregate=method)
        assert scorer.score_steps(prompt, steps) == pytest.approx(per_step, abs=1e-5)
        assert scorer([prompt], [text])[0] == pytest.approx(aggregate_step_scores(per_step, method), abs=1e-5)
    assert math.prod(per_step) <= min(per_step)


def test_saved_and_reloaded_prm_scores_identically(process_dir):
    path, trainer = process_dir
    prompts, completions = _completions()
    completions = [c.replace(". ", ".\n") for c in completions]
    in_memory = RewardModelScorer(trainer.model, trainer.tokenizer, kind="process", aggregate="product")
    reloaded = RewardModelScorer(str(path), kind="process", aggregate="product", batch_size=4)
    assert reloaded(prompts, completions) == pytest.approx(in_memory(prompts, completions), abs=1e-5)


def test_scorer_is_a_reward_function_for_the_online_methods(outcome_dir):
    from posttrain.online.rewards import reward_func_name, resolve_reward_func

    path, _ = outcome_dir
    scorer = RewardModelScorer(str(path), name="arith_rm")
    func = resolve_reward_func(scorer)
    assert reward_func_name(func) == "arith_rm"
    prompts, completions = _completions()
    assert func(prompts, completions, None) == pytest.approx(scorer(prompts, completions))


def test_scorer_restores_training_mode_and_rejects_bad_arguments(outcome_dir):
    _, trainer = outcome_dir
    model = load_model("tiny:nano", task="seq-cls")
    tok = ensure_chat_template(load_tokenizer("tiny:nano"))
    model.train()
    RewardModelScorer(model, tok)(["a"], ["b"])
    assert model.training
    with pytest.raises(ValueError, match="kind"):
        RewardModelScorer(model, tok, kind="pairwise")
    with pytest.raises(ValueError, match="aggregate"):
        RewardModelScorer(model, tok, kind="process", aggregate="median")
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        RewardModelScorer(model, tok)(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="process reward model"):
        RewardModelScorer(model, tok).score_steps("a", ["b"])
