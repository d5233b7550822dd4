"""TRL 1.16's documented agent examples, run with only the import changed (``trl`` -> ``posttrain``) and a
local tiny model whose tokenizer uses posttrain's ChatML template (it renders tools; the tiny tokenizer's own
template does not). Sources: the GRPO trainer page's "Agent Training" section (``tools=[multiply,
async_add]``) and the OpenEnv page's quick start (``environment_factory=EchoToolEnv``, a reward reading
``environments``), with the remote echo server replaced by a local echo."""

from __future__ import annotations

import pytest
from datasets import Dataset

from posttrain import GRPOConfig, GRPOTrainer
from posttrain.data.templates import trainer_tokenizer
from posttrain.models import build_tiny

from _agent_helpers import ScriptedEngine, call
from _online_helpers import _one_thread  # noqa: F401  (autouse)


@pytest.fixture(scope="module")
def local_model():
    model, tok = build_tiny("nano")
    return model, trainer_tokenizer(tok, "chatml")[1]


def _args(**kw):
    base = dict(output_dir="/tmp/posttrain-test-trl-agent", num_generations=2, per_device_train_batch_size=4,
                max_completion_length=48, max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    return GRPOConfig(**{**base, **kw})


# ---- GRPO trainer docs, "Agent Training" ------------------------------------------------------------------
def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def async_add(a: int, b: int) -> int:
    """
    Asynchronously adds two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The sum of the two integers.
    """
    return a + b


def test_docs_tools_example_trains(local_model):
    model, tok = local_model
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} times 7?"}]} for i in range(8)])

    def reward_func(completions, **kwargs):
        return [float(len(c[-1]["content"])) for c in completions]

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_func,
        args=_args(),
        train_dataset=dataset,
        processing_class=tok,
        tools=[multiply, async_add],
    )
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"tools/call_frequency", "tools/failure_frequency", "reward"} <= logged
    # both schemas are in the prompt the model is given
    rollout = trainer.rollout([trainer.train_dataset[0]], "train")
    text = tok.decode(rollout.prompt_ids[0])
    assert '"name": "multiply"' in text and '"name": "async_add"' in text


def test_docs_tools_example_executes_the_calls(local_model):
    """The same trainer with a scripted engine standing in for a model that has learned to call tools."""
    model, tok = local_model
    script = lambda turn, text: call("multiply", a=6, b=7) if turn == 0 else "42"  # noqa: E731
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is 6 times 7?"}]}] * 4)
    seen = []

    def reward_func(completions, **kwargs):
        seen.extend(completions)
        return [1.0 if c[-1]["content"] == "42" else 0.0 for c in completions]

    trainer = GRPOTrainer(model=model, reward_funcs=reward_func, args=_args(max_completion_length=200),
                          train_dataset=dataset, processing_class=tok, tools=[multiply, async_add],
                          engine=ScriptedEngine(tok, script))
    trainer.train()
    assert seen[0][1] == {"role": "tool", "name": "multiply", "content": "42"}
    assert [h["tools/call_frequency"] for h in trainer.state.log_history if "tools/call_frequency" in h] == [1.0]


# ---- OpenEnv docs, quick start (the echo server replaced by a local echo) ------------------------------------
class EchoToolEnv:
    def __init__(self):
        self.reward = 0.0

    def reset(self, **kwargs) -> str | None:
        self.reward = 0.0
        return None

    def echo(self, message: str) -> str:
        """
        Echo the message back from the environment.

        Args:
            message: The message to echo

        Returns:
            The echoed message.
        """
        self.reward = float(len(message)) / 10
        return message


def reward_func(environments, **kwargs):
    return [env.reward for env in environments]


@pytest.mark.parametrize("scripted", [False, True])
def test_openenv_quickstart_example_trains(local_model, scripted):
    model, tok = local_model
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "Try to echo 'Hello World!' in the environment."}]] * 8}
    )
    engine = ScriptedEngine(tok, lambda turn, text: call("echo", message="Hello World!") if turn == 0 else "done")
    trainer = GRPOTrainer(
        model=model,
        train_dataset=dataset,
        reward_funcs=reward_func,
        args=_args(chat_template_kwargs={"enable_thinking": False}, log_completions=True,
                   max_completion_length=200 if scripted else 48),
        processing_class=tok,
        environment_factory=EchoToolEnv,
        **({"engine": engine} if scripted else {}),
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if scripted:  # every rollout echoed 'Hello World!' (12 characters): the environment's state is the reward
        assert rewards == [pytest.approx(1.2)]
    else:  # a random model calls no tool: the environments keep their reset state
        assert rewards == [0.0]
