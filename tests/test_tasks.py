"""posttrain.tasks: the arithmetic task's data in every format, its rewards, and exact-match evaluation."""

from __future__ import annotations

import re

import pytest

from posttrain.data import DatasetKind, validate_dataset
from posttrain.models import build_tiny
from posttrain.tasks import (
    ArithmeticTask,
    Problem,
    accuracy_reward,
    check_step,
    exact_match,
    extract_answer,
    format_reward,
    solve,
)

KINDS = {
    "language_modeling": DatasetKind.LANGUAGE_MODELING,
    "prompt_only": DatasetKind.PROMPT_ONLY,
    "prompt_completion": DatasetKind.PROMPT_COMPLETION,
    "preference": DatasetKind.PREFERENCE,
    "unpaired_preference": DatasetKind.UNPAIRED_PREFERENCE,
    "stepwise": DatasetKind.STEPWISE,
}


def step_is_right(step: str) -> bool:
    """Independent check of one column step, by evaluating its left-hand side as Python."""
    m = re.fullmatch(r"([0-9+\-]+)=(\d+), write (\d) (carry|borrow) (\d)\.", step)
    assert m, f"not a column step: {step!r}"
    lhs, value, written, kind, out = m[1], int(m[2]), int(m[3]), m[4], int(m[5])
    if eval(re.sub(r"\b0+(\d)", r"\1", lhs)) != value:  # noqa: S307 - digits and +/- only, matched above
        return False
    if kind == "carry":
        return written == value % 10 and out == value // 10
    borrowed = int(lhs.split("-")[0]) >= 10
    return written == value and 0 <= value <= 9 and out == int(borrowed)


def stated_answer_is_consistent(steps: list[str]) -> bool:
    """The final answer is the written digits (plus a final carry), read left to right."""
    digits, carry = [], 0
    for s in steps[:-1]:
        m = re.search(r"write (\d) (carry|borrow) (\d)", s)
        digits.append(m[1])
        carry = int(m[3]) if m[2] == "carry" else 0
    expected = int(("1" if carry else "") + "".join(reversed(digits)))
    return extract_answer(steps[-1]) == str(expected)


def text_of(x):
    return x if isinstance(x, str) else x[-1]["content"]


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_format_validates(kind, conversational):
    task = ArithmeticTask(digits=2, seed=1, conversational=conversational,
                          system_prompt="Solve it." if conversational else None)
    ds = getattr(task, kind)(20)
    info = validate_dataset(ds, [KINDS[kind]])
    assert info.kind is KINDS[kind] and info.conversational is conversational
    assert len(ds) == 20 and "answer" in ds.column_names
    first = ds[0]
    key = "messages" if kind == "language_modeling" and conversational else (
        "text" if kind == "language_modeling" else "prompt")
    if conversational:
        assert first[key][0] == {"role": "system", "content": "Solve it."}
        assert first[key][1]["role"] == "user"
    for row in ds:
        a, op, b = re.search(r"What is (\d+) ([+-]) (\d+)\?", str(row[key])).groups()
        assert row["answer"] == str(int(a) + int(b))


def test_implicit_prompt_preference():
    for conversational in (False, True):
        ds = ArithmeticTask(conversational=conversational).preference(10, implicit_prompt=True)
        info = validate_dataset(ds, [DatasetKind.PREFERENCE])
        assert info.implicit_prompt and "prompt" not in ds.column_names


def test_solutions_are_correct_and_checkable():
    task = ArithmeticTask(digits=3, seed=2, operations=("+", "-"))
    for p in task.problems(200):
        sol = solve(p)
        assert sol.correct and sol.answer == str(p.answer)
        assert all(step_is_right(s) and check_step(s) for s in sol.steps[:-1])
        assert stated_answer_is_consistent(list(sol.steps))
    assert solve(Problem(47, 85)).text == "7+5+0=12, write 2 carry 1. 4+8+1=13, write 3 carry 1. <answer>132</answer>"
    assert solve(Problem(85, 47, "-")).text == "15-7-0=8, write 8 borrow 1. 08-4-1=3, write 3 borrow 0. <answer>38</answer>"
    assert solve(Problem(12, 30)).text == "2+0+0=02, write 2 carry 0. 1+3+0=04, write 4 carry 0. <answer>42</answer>"
    assert solve(Problem(105, 98, "-")).answer == "7"


@pytest.mark.parametrize("errors", ["sum", "carry"])
def test_preference_rejected_is_wrong_and_chosen_right(errors):
    ds = ArithmeticTask(digits=3, seed=3, operations=("+", "-"), errors=errors).preference(100)
    for row in ds:
        assert extract_answer(row["chosen"]) == row["answer"]
        assert extract_answer(row["rejected"]) != row["answer"]
        steps = re.findall(r"[^.<]+\.|<answer>.*?</answer>", row["rejected"])
        wrong_steps = [s.strip() for s in steps[:-1] if not step_is_right(s.strip())]
        # either exactly one wrong column step (the error propagates), or a wrong final answer only
        assert len(wrong_steps) == 1 or (not wrong_steps and not stated_answer_is_consistent([s.strip() for s in steps]))


@pytest.mark.parametrize("errors", ["sum", "carry"])
def test_stepwise_labels_match_the_arithmetic(errors):
    ds = ArithmeticTask(digits=3, seed=4, operations=("+", "-"), errors=errors).stepwise(200)
    n_with_error = 0
    for row in ds:
        steps, labels = row["completions"], row["labels"]
        assert len(steps) == len(labels) == 4
        first_false = labels.index(False) if False in labels else len(labels)
        assert labels == [True] * first_false + [False] * (len(labels) - first_false)
        assert all(step_is_right(s) for s in steps[:min(first_false, 3)])
        if first_false < len(labels):
            n_with_error += 1
            assert extract_answer(steps[-1]) != row["answer"]
            if first_false < 3:  # the first wrong step is wrong on its face
                assert not step_is_right(steps[first_false]) and check_step(steps[first_false]) is False
            else:  # all columns right, the final answer does not match them
                assert not stated_answer_is_consistent(steps)
        else:
            assert extract_answer(steps[-1]) == row["answer"]
    assert 70 <= n_with_error <= 130  # about half


def test_carry_errors_keep_the_sum_and_flip_the_carry():
    """A "carry" slip states the right sum and the wrong carry (borrow); the next column adds what was stated."""
    sol = solve(Problem(47, 85), error_step=0, error_kind="carry")
    assert sol.steps[:2] == ("7+5+0=12, write 2 carry 0.", "4+8+0=12, write 2 carry 1.") and sol.answer == "122"
    sol = solve(Problem(52, 17, "-"), error_step=0, error_kind="carry")
    assert sol.steps[0] == "12-7-0=5, write 5 borrow 0." and check_step(sol.steps[0]) is False and sol.answer == "45"
    # a borrow out of the last column never reaches the answer: there the slip is a sum error
    assert not solve(Problem(52, 17, "-"), error_step=1, error_kind="carry").correct
    with pytest.raises(ValueError, match="error_kind"):
        solve(Problem(1, 2), error_step=0, error_kind="digit")
    with pytest.raises(ValueError, match="errors"):
        ArithmeticTask(errors="digit")


def test_unpaired_labels():
    ds = ArithmeticTask(seed=5).unpaired_preference(200)
    for row in ds:
        assert (extract_answer(row["completion"]) == row["answer"]) is row["label"]
    assert 70 <= sum(ds["label"]) <= 130


def test_split_is_disjoint_and_deterministic():
    task = ArithmeticTask(digits=2, seed=0)
    dd = task.split(300, 100)
    assert set(dd) == {"train", "test"}
    assert dd["train"].column_names == ["prompt", "completion", "answer"]
    assert dd["test"].column_names == ["prompt", "answer"]

    def key(prompt):
        a, b = map(int, re.findall(r"\d+", prompt))
        return min(a, b), max(a, b)

    train = {key(p) for p in dd["train"]["prompt"]}
    test = {key(p) for p in dd["test"]["prompt"]}
    assert len(train) == 300 and len(test) == 100 and not train & test
    assert ArithmeticTask(digits=2, seed=0).split(300, 100)["test"]["prompt"] == dd["test"]["prompt"]
    assert ArithmeticTask(digits=2, seed=1).prompt_only(50)["prompt"] != task.prompt_only(50)["prompt"]
    # a small problem space can be exhausted exactly, and not beyond
    one = ArithmeticTask(digits=1)
    assert len({(p.a, p.b) for p in one.problems(55)}) == 55
    with pytest.raises(ValueError, match="only 55"):
        one.problems(56)


def test_rewards():
    good = "7+5+0=12, write 2 carry 1. 4+8+1=13, write 3 carry 1. <answer>132</answer>"
    bad = "7+5+0=13, write 3 carry 1. 4+8+1=13, write 3 carry 1. <answer>133</answer>"
    prompts = ["What is 47 + 85?\n"] * 5
    completions = [good, bad, "no answer here", "<answer> 132 </answer>", [{"role": "assistant", "content": good}]]
    assert accuracy_reward(prompts, completions, answer=["132"] * 5) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert format_reward(prompts, completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert format_reward([""], ["<answer>5</answer><answer>6</answer>"]) == [0.0]
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("nothing") is None
    assert check_step("not a step") is None


def test_exact_match_on_tiny_model():
    model, tok = build_tiny("nano")
    task = ArithmeticTask(digits=1)
    acc, samples = exact_match(model, tok, task.prompt_only(6), max_new_tokens=6, batch_size=4, return_samples=True)
    assert 0.0 <= acc <= 1.0 and len(samples) == 6
    assert all(isinstance(c, str) for _, c, _ in samples)
    assert acc == sum(ok for *_, ok in samples) / 6
    assert tok.padding_side == "right" and not model.training
    conv = ArithmeticTask(digits=1, conversational=True).prompt_only(3)
    assert 0.0 <= exact_match(model, tok, conv, max_new_tokens=4) <= 1.0


def test_exact_match_scores_a_perfect_model():
    """A model that always emits the right solution must score 1.0. Evaluation decodes through a rollout
    engine, so the stand-in for the perfect model is an engine that answers with the true solutions; it also
    sees what evaluation asks for: greedy decoding, the token budget, one completion per prompt."""
    from posttrain.online.engines import Rollout, RolloutEngine

    model, tok = build_tiny("nano")
    ds = ArithmeticTask(digits=2, seed=7).prompt_only(5)
    asked = []

    class PerfectEngine(RolloutEngine):
        samples_from_policy = True

        def generate(self, prompts, params):
            asked.append(params)
            texts = [solve(Problem(*map(int, re.findall(r"\d+", q)))).text for q in prompts]
            ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
            return Rollout(prompt_index=list(range(len(prompts))), prompt_ids=[tok(q)["input_ids"] for q in prompts],
                           completion_ids=ids, texts=texts, logprobs=[[0.0] * len(i) for i in ids],
                           truncated=[False] * len(ids)).check()

    assert exact_match(model, tok, ds, batch_size=2, engine=PerfectEngine()) == 1.0
    (params,) = asked
    assert params.greedy and params.n == 1 and params.max_new_tokens == 64


def test_greedy_completions_are_model_generate_greedy_through_the_engine():
    """Evaluation decodes through the HF rollout engine; on a model with varied outputs it gives what a plain
    greedy `model.generate` gives (left padding, stop at EOS or <|im_end|>), plain and conversational."""
    import torch

    from posttrain.tasks.evaluate import greedy_completions

    model, tok = build_tiny("nano", seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # random weights of a larger scale than the init: diverse, not repetitive outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]

    def generate_greedy(texts):
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tok.padding_side = "right"
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=stops, temperature=None, top_p=None, top_k=None)
        return [tok.decode(row, skip_special_tokens=True) for row in out[:, enc["input_ids"].shape[1]:].tolist()]

    plain = ArithmeticTask(digits=2).prompt_only(6)["prompt"]
    conv = ArithmeticTask(digits=2, conversational=True).prompt_only(4)["prompt"]
    rendered = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conv]
    got_plain = greedy_completions(model, tok, plain, max_new_tokens=12, batch_size=4)
    assert len(set(got_plain)) > 1
    assert got_plain == [generate_greedy([t])[0] for t in plain]
    assert greedy_completions(model, tok, conv, max_new_tokens=12) == [generate_greedy([t])[0] for t in rendered]


def test_answer_only_demonstrations_skip_the_steps_on_the_asked_share_of_rows():
    from posttrain.tasks import ArithmeticTask

    task = ArithmeticTask(digits=2, seed=0)
    full, mixed = task.prompt_completion(400), task.prompt_completion(400, answer_only=0.5)
    short = [i for i, c in enumerate(mixed["completion"]) if "write" not in c]
    assert 160 <= len(short) <= 240  # about half, seeded
    assert all(mixed["completion"][i] == f"<answer>{mixed['answer'][i]}</answer>" for i in short)
    assert all(mixed["completion"][i] == full["completion"][i] for i in range(400) if i not in set(short))
    assert task.prompt_completion(400, answer_only=0.5)["completion"] == mixed["completion"]
    import pytest

    with pytest.raises(ValueError, match="answer_only"):
        task.prompt_completion(4, answer_only=1.5)
