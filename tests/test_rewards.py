"""Reward functions: built-ins, resolution, composition (weights, None, async) and error reporting."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import torch

from posttrain.online.rewards import builtin as rb
from posttrain.online.rewards.builtin import (
    answers_match_fallback, completion_text, extract_tag, make_accuracy_reward,
    make_format_reward, make_length_reward, make_soft_overlong_reward,
)
from posttrain.online.rewards import RewardComposer, RewardFunctionError, resolve_reward_func
from posttrain.tasks import Problem, solve  # imported here: the task module's import is the slow part
from posttrain.tasks.rewards import make_arithmetic_reward

# ----------------------------------------------------------------------------- built-ins


def test_completion_text_and_extract_tag():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    assert extract_tag("x <answer> 1 </answer> y <answer>2</answer>", "answer") == "2"
    assert extract_tag("no tags", "answer") is None


def test_accuracy_with_math_verify_equivalence():
    pytest.importorskip("math_verify")  # installed by the dev extra
    acc = make_accuracy_reward()
    completions = [
        "<think>half</think><answer>\\frac{1}{2}</answer>",
        "<answer>0.5</answer>",
        "<answer>42</answer>",
        "The answer is $\\boxed{42}$.",
        [{"role": "assistant", "content": "<answer>7</answer>"}],
        "<answer>41</answer>",
        "<answer>x</answer>",
    ]
    gold = ["0.5", "1/2", "42", "42", "7", "42", None]
    assert acc(["p"] * 7, completions, solution=gold) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, None]
    # the 'answer' column is used when there is no 'solution' column
    assert acc(["p"], ["<answer>3</answer>"], answer=["3"]) == [1.0]


def test_accuracy_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(rb, "_math_verify_match", lambda answer, gold: None)
    acc = make_accuracy_reward()
    completions = ["<answer> 1,000 </answer>", "I think it is 12.", "<answer>12 or 13</answer>", "<answer>Paris.</answer>"]
    assert acc(["p"] * 4, completions, answer=["1000", "12", "12", "paris"]) == [1.0, 1.0, 0.0, 1.0]
    assert answers_match_fallback("$\\boxed{3.0}$", "3", tagged=True)
    assert not answers_match_fallback("3.01", "3", tagged=True)


def test_accuracy_without_gold_column_raises_keyerror():
    with pytest.raises(KeyError, match="solution"):
        make_accuracy_reward()(["p"], ["c"])


def test_format_reward_variants():
    cs = [
        "<think>hmm</think>\n<answer>4</answer>",
        "<answer>4</answer>",
        "sure: <answer>4</answer>",
        "<think>x</think>",
        "<answer>4</answer> trailing",
    ]
    assert make_format_reward()(None, cs) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert make_format_reward(require_think=True)(None, cs) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert make_format_reward(strict=False)(None, cs) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert make_format_reward(answer_tag="final", think_tag=None)(None, ["<final>1</final>", "<answer>1</answer>"]) == [1.0, 0.0]


def test_soft_overlong_matches_dapo_formula():
    L_max, buf = 20, 5
    f = make_soft_overlong_reward(L_max, buf)
    lengths = [0, 15, 16, 18, 20, 21, 30]
    expected = []
    for L in lengths:
        if L <= L_max - buf:
            expected.append(0.0)
        elif L <= L_max:
            expected.append((L_max - buf - L) / buf)
        else:
            expected.append(-1.0)
    assert f(None, [""] * len(lengths), [[1] * L for L in lengths]) == pytest.approx(expected)
    assert make_soft_overlong_reward(16)(None, [""], [[1] * 14]) == pytest.approx([(12 - 14) / 4])
    with pytest.raises(ValueError, match="overlong_buffer"):
        make_soft_overlong_reward(10, 11)


def test_length_and_arithmetic_rewards():
    assert make_length_reward(target_length=4)(None, ["", ""], [[1] * 4, [1] * 6]) == [0.0, -0.5]
    assert make_length_reward(max_completion_length=8)(None, [""], [[1] * 2]) == [-0.25]
    with pytest.raises(ValueError):
        make_length_reward()
    arith = make_arithmetic_reward()
    assert arith(None, ["<answer>12</answer>", "<answer>1 2</answer>", "12", "<answer>13</answer>"], answer=[12, "12", "12", 12]) == [1.0, 1.0, 0.0, 0.0]
    fmt = resolve_reward_func("arithmetic_format")
    good = solve(Problem(47, 85, "+")).text
    assert fmt(None, [good, "<answer>5</answer> <answer>5</answer>"]) == [1.0, 0.0]
    steps = resolve_reward_func("arithmetic_steps")
    reference = solve(Problem(47, 85, "+")).steps
    wrong_middle = " ".join([reference[0], "4+8+1=14, write 4 carry 1.", reference[2]])
    prompts = ["What is 47 + 85?\n"] * 4 + ["Hello", [{"role": "user", "content": "What is 47 + 85?"}]]
    got = steps(prompts, [good, wrong_middle, reference[-1], "", "x", [{"role": "assistant", "content": good}]])
    assert got == [1.0, pytest.approx(2 / 3), 0.0, 0.0, None, 1.0]


# ----------------------------------------------------------------------------- resolution


def test_resolve_builtin_dict_and_import_paths(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shout(prompts, completions, **kw):\n    return [float(c.isupper()) for c in completions]\n"
        "def make_const(value):\n    def const(prompts, completions, **kw):\n        return [value] * len(completions)\n    return const\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("my_rewards:shout", "my_rewards.shout"):
        assert resolve_reward_func(spec)(prompts=["p", "p"], completions=["AB", "ab"]) == [1.0, 0.0]
    assert resolve_reward_func({"name": "my_rewards:make_const", "value": 0.3})(["p"], ["x"]) == [0.3]
    f = resolve_reward_func("soft_overlong", max_completion_length=8)  # context fills the factory
    assert f(None, [""], [[1] * 6]) == [0.0] and f(None, [""], [[1] * 8]) == [-1.0]
    f = resolve_reward_func({"name": "soft_overlong", "overlong_buffer": 2}, max_completion_length=8)
    assert f(None, [""], [[1] * 7]) == [-0.5]
    assert resolve_reward_func("format").__name__ == "format_reward"
    with pytest.raises(ValueError, match="cannot resolve reward 'nonexistent_thing'.*accuracy"):
        resolve_reward_func("nonexistent_thing")
    with pytest.raises(ValueError, match="cannot resolve reward 'my_rewards:nope'"):
        resolve_reward_func("my_rewards:nope")


def test_reward_model_accepted_wherever_a_function_is():
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.online.rewards.reward_model import RewardModelScorer

    spec = "tiny:nano"
    model = load_model(spec, task="seq-cls")
    tok = load_tokenizer(spec)
    prompts = ["2+2=", [{"role": "user", "content": "2+3="}]]
    completions = ["<answer>4</answer>", [{"role": "assistant", "content": "<answer>5</answer>"}]]
    scorer = RewardModelScorer(load_model(spec, task="seq-cls"), tokenizer=tok, name="my_rm")
    expected = scorer(prompts, completions)
    # by object, by spec string (same seed: same model), a scorer object, beside a built-in, a RewardModelScorer
    composer = RewardComposer([model, spec, _ConstScorer(), "length", scorer],
                              reward_processing_classes=[tok, None, None, None, None], max_completion_length=10)
    batch = composer(prompts, completions, [[1, 2], [1, 2, 3]])
    assert batch.per_func[:, 0].tolist() == pytest.approx(expected, rel=1e-5)
    assert batch.per_func[:, 1].tolist() == pytest.approx(expected, rel=1e-5)
    assert expected[0] != expected[1]
    assert batch.per_func[:, 2].tolist() == [2.0, 2.0]
    assert batch.per_func[:, 3].tolist() == pytest.approx([-0.2, -0.3])
    assert composer.names[2] == "_ConstScorer" and composer.names[3] == "length"
    assert composer.funcs[4] is scorer and composer.names[4] == "my_rm"
    assert batch.per_func[:, 4].tolist() == pytest.approx(expected, rel=1e-5)


class _ConstScorer:
    def score(self, prompts, completions):
        return torch.full((len(prompts),), 2.0)


# ----------------------------------------------------------------------------- composition


def _one(prompts, completions, completion_ids, **kw):
    return [1.0] * len(completions)


def _maybe(prompts, completions, completion_ids, applies, **kw):
    return [2.0 if a else None for a in applies]


def test_weighted_sum_skips_none():
    comp = RewardComposer([_one, _maybe], reward_weights=[0.5, 3.0])
    batch = comp(["a", "b", "c"], ["x", "y", "z"], [[1], [2], [3]], applies=[True, False, True])
    assert batch.total.tolist() == [0.5 + 6.0, 0.5, 0.5 + 6.0]
    assert torch.isnan(batch.per_func[1, 1])
    m = batch.metrics()
    assert m["rewards/_maybe/mean"] == 2.0 and m["rewards/_one/mean"] == 1.0
    assert m["reward"] == pytest.approx((6.5 + 0.5 + 6.5) / 3)
    assert m["rewards/all_none"] == 0.0


def test_all_none_is_zero_counted_and_warned_or_an_error(caplog):
    comp = RewardComposer([_maybe])
    with caplog.at_level(logging.WARNING):
        batch = comp(["a", "b"], ["x", "y"], [[1], [2]], applies=[False, True])
    assert batch.total.tolist() == [0.0, 2.0] and batch.all_none == 1
    assert batch.metrics()["rewards/all_none"] == 1.0
    assert "sample 0" in caplog.text and "'a'" in caplog.text
    strict = RewardComposer([_maybe], all_none="error")
    with pytest.raises(RewardFunctionError, match=r"every reward function returned None for sample 0 \(prompt='a'"):
        strict(["a", "b"], ["x", "y"], [[1], [2]], applies=[False, True])


def test_columns_only_reach_functions_that_take_them():
    def narrow(prompts, completions, completion_ids):
        return [0.0] * len(prompts)

    assert RewardComposer([narrow])(["a"], ["b"], [[1]], extra=[1]).total.tolist() == [0.0]


def test_async_functions_run_concurrently_in_one_loop():
    loops = []

    async def slow_a(prompts, completions, completion_ids, **kw):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0.3)
        return [1.0] * len(prompts)

    async def slow_b(prompts, completions, completion_ids, **kw):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0.3)
        return [2.0] * len(prompts)

    comp = RewardComposer([slow_a, _one, slow_b])
    start = time.perf_counter()
    batch = comp(["p"] * 2, ["c"] * 2, [[1]] * 2)
    elapsed = time.perf_counter() - start
    assert batch.total.tolist() == [4.0, 4.0]
    assert elapsed < 0.55, elapsed  # sequential would take >= 0.6 s
    assert len(loops) == 2 and loops[0] is loops[1]


def test_async_inside_running_loop():
    async def a(prompts, completions, completion_ids, **kw):
        return [1.0] * len(prompts)

    async def main():
        return RewardComposer([a])(["p"], ["c"], [[1]]).total.tolist()

    assert asyncio.run(main()) == [1.0]


# ----------------------------------------------------------------------------- errors


def test_raising_function_names_itself_and_the_failing_sample():
    def picky(prompts, completions, completion_ids, **kw):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on an empty completion

    comp = RewardComposer([_one, picky])
    with pytest.raises(RewardFunctionError) as info:
        comp(["q0", "q1", "q2"], ["ok", "", "fine"], [[1], [], [2]])
    msg = str(info.value)
    assert "'picky'" in msg and "ZeroDivisionError" in msg and "sample 1" in msg
    assert "prompt='q1'" in msg and "completion=''" in msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_raising_async_function_is_located_too():
    async def bad(prompts, completions, completion_ids, **kw):
        if "boom" in completions:
            raise ValueError("cannot score")
        return [0.0] * len(prompts)

    with pytest.raises(RewardFunctionError, match=r"'bad' raised ValueError: cannot score on sample 2 \(prompt='c'"):
        RewardComposer([bad])(["a", "b", "c"], ["x", "y", "boom"], [[1]] * 3)


def test_batch_only_failure_is_reported_as_such():
    def needs_pairs(prompts, completions, completion_ids, **kw):
        if len(prompts) > 2:
            raise RuntimeError("odd batch")
        return [0.0] * len(prompts)

    with pytest.raises(RewardFunctionError, match="on a batch of 3 samples"):
        RewardComposer([needs_pairs])(["a", "b", "c"], ["x", "y", "z"], [[1]] * 3)


@pytest.mark.parametrize(
    "values, pattern",
    [
        ([0.0, float("nan")], r"'bad' returned nan for sample 1 \(prompt='b', completion='y'\)"),
        ([0.0, float("inf")], "returned inf for sample 1"),
        ([0.0], "returned 1 values for 2 completions"),
        ([0.0, "1"], r"returned '1' \(str\) for sample 1"),
        (3.0, "returned float"),
    ],
)
def test_invalid_outputs_raise(values, pattern):
    def bad(prompts, completions, completion_ids, **kw):
        return values

    with pytest.raises(RewardFunctionError, match=pattern):
        RewardComposer([bad])(["a", "b"], ["x", "y"], [[1], [2]])


def test_tensor_and_bool_outputs_accepted_and_weights_validated():
    def tens(prompts, completions, completion_ids, **kw):
        return torch.tensor([0.25, 0.75])

    def flags(prompts, completions, completion_ids, **kw):
        return [True, False]

    assert RewardComposer([tens, flags])(["a", "b"], ["x", "y"], [[1], [2]]).total.tolist() == [1.25, 0.75]
    with pytest.raises(ValueError, match="2 reward_weights for 1 reward functions"):
        RewardComposer([tens], reward_weights=[1.0, 2.0])
    assert RewardComposer([tens, tens]).names == ["tens", "tens_2"]


def test_public_import_paths_of_the_rewards_package():
    """The names users import keep working after rewards became one package: the composer API from
    `posttrain.online.rewards`, the scorer also from the README's first path `posttrain.online.reward_model`."""
    import posttrain
    import posttrain.online.reward_model as old_path
    from posttrain.online import rewards
    from posttrain.online.rewards import compose, reward_model

    assert rewards.RewardComposer is compose.RewardComposer is posttrain.RewardComposer
    assert rewards.RewardFunctionError is compose.RewardFunctionError is posttrain.RewardFunctionError
    assert rewards.RewardBatch is compose.RewardBatch
    assert old_path.RewardModelScorer is rewards.RewardModelScorer is reward_model.RewardModelScorer


def test_completion_text_reads_every_completion_form():
    """One reader for strings, messages, message lists and content parts, shared by the built-in rewards,
    the arithmetic task and the reward models (before, the task had its own with other edge cases)."""
    from posttrain.data.messages import completion_text as home
    from posttrain.tasks import extract_answer, format_reward

    assert completion_text is home
    assert home({"role": "assistant", "content": "x"}) == "x"
    assert home([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert home([{"role": "assistant", "content": None}]) == "" and home([]) == "" and home(None) == ""
    assert home({"role": "assistant", "content": [{"type": "text", "text": "<answer>4</answer>"}]}) == "<answer>4</answer>"
    assert home(["plain", "last"]) == "last" and home(7) == "7"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "<answer>12</answer>"}]}]
    assert extract_answer(parts) == "12" and format_reward([""], [parts]) == [1.0]


def test_every_builtin_name_resolves_generic_and_task_rewards():
    """The names in the README still resolve after the task rewards moved to posttrain.tasks.rewards, and the
    task rewards keep the names their metrics are logged under (rewards/arithmetic/mean, ...)."""
    from posttrain.online.rewards.builtin import BUILTIN_REWARDS, builtin_names
    from posttrain.online.rewards.compose import reward_func_name
    from posttrain.tasks.rewards import TASK_REWARDS

    assert set(BUILTIN_REWARDS) == {"accuracy", "format", "length", "soft_overlong", "think_format", "cosine_scaled",
                                    "repetition_penalty"}
    assert set(TASK_REWARDS) == {"arithmetic", "arithmetic_format", "arithmetic_steps"}
    assert builtin_names() == sorted([*BUILTIN_REWARDS, *TASK_REWARDS])
    for name in builtin_names():
        assert callable(resolve_reward_func(name, max_completion_length=16)), name
    for name in TASK_REWARDS:
        assert reward_func_name(resolve_reward_func(name)) == name
        assert reward_func_name(resolve_reward_func({"name": name})) == name
