"""Exact-match evaluation of a model on a task's held-out prompts by greedy decoding.

Used by the quickstart, examples and tests to show that a trainer made the model better at the task. It
decodes through a rollout engine (by default the HF engine on the model, the one online training samples
with), so evaluation and training share one generation path, prompt encoding and stop tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from ..online.engine_hf import HFEngine
from ..online.engines import RolloutEngine, SamplingParams, default_stop_token_ids
from .arithmetic import accuracy_reward

__all__ = ["ExactMatchCallback", "exact_match", "greedy_completions", "tool_exact_match"]


def _as_prompt(prompt: Any, conversational: bool) -> Any:
    if conversational:
        return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not isinstance(prompt, str):
        raise TypeError(f"conversational=False needs string prompts, got {type(prompt).__name__}")
    return prompt


def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    conversational: bool | None = None,
    engine: RolloutEngine | None = None,
) -> list[str]:
    """Greedy-decode each prompt and return the completion texts (decoded without special tokens).

    ``engine`` generates (e.g. a trainer's own); by default an `HFEngine` on ``model`` (batched in chunks of
    ``batch_size``, left-padded, KV cache; the model's train/eval mode is restored). `conversational=None`
    decides from the first prompt (a list of messages -> chat template with the generation prompt);
    ``conversational=True`` makes a string prompt a user message. Generation stops at the engine's stop ids
    (`default_stop_token_ids`: EOS and the model's generation-config EOS ids) and, for conversations, at the
    chat template's end-of-turn token.
    """
    if conversational is None:
        conversational = bool(prompts) and isinstance(prompts[0], list)
    inputs = [_as_prompt(p, conversational) for p in prompts]
    if not inputs:
        return []
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=default_stop_token_ids(tokenizer, end_of_turn=True) if conversational else None)
    if engine is None:
        engine = HFEngine(model, tokenizer, max_batch_size=batch_size)
    return list(engine.generate(inputs, params).texts)


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    conversational: bool | None = None,
    return_samples: bool = False,
    engine: RolloutEngine | None = None,
) -> float | tuple[float, list[tuple[Any, str, bool]]]:
    """Fraction of `dataset` rows (`prompt`, `answer` columns) whose greedy completion's `<answer>`
    equals `answer`. With `return_samples=True` also returns `(prompt, completion, correct)` per row.
    ``engine``: the rollout engine to decode with (default: the HF engine on ``model``)."""
    prompts, answers = list(dataset["prompt"]), [str(a) for a in dataset["answer"]]
    if not prompts:
        raise ValueError("exact_match needs a non-empty dataset with 'prompt' and 'answer' columns")
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, conversational=conversational, engine=engine)
    scores = accuracy_reward(prompts, completions, answers)
    accuracy = sum(scores) / len(scores)
    if return_samples:
        return accuracy, [(p, c, s == 1.0) for p, c, s in zip(prompts, completions, scores)]
    return accuracy


def tool_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    *,
    tools: Sequence[Any] | None = None,
    environment_factory: Any = None,
    max_new_tokens: int = 96,
    max_tool_calling_iterations: int | None = None,
    batch_size: int = 64,
    return_samples: bool = False,
    engine: RolloutEngine | None = None,
) -> float | tuple[float, list[tuple[Any, list[dict], bool]]]:
    """Fraction of `dataset` rows (conversational ``prompt``, ``answer``, and whatever columns the
    environment's ``reset`` reads) whose greedy *multi-turn* rollout with the tools ends in an ``<answer>``
    equal to ``answer``.

    It runs the rollout loop the online trainers train with (`posttrain.online.multiturn.Agent`: the tool
    schemas in the prompt, calls parsed and executed, results appended, until the model answers,
    ``max_tool_calling_iterations`` or ``max_new_tokens`` generated plus tool tokens), on ``engine`` (default:
    the HF engine on ``model``), so a model is scored on what training optimized. Without ``tools`` and
    ``environment_factory`` it is `exact_match` (one turn, no schema). With ``return_samples=True`` also
    returns ``(prompt, messages, correct)`` per row."""
    from ..online.multiturn import Agent, AgentSpec

    if not tools and environment_factory is None:
        return exact_match(model, tokenizer, dataset, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           conversational=True, return_samples=return_samples, engine=engine)
    rows = list(dataset)
    if not rows:
        raise ValueError("tool_exact_match needs a non-empty dataset with 'prompt' and 'answer' columns")
    if engine is None:
        engine = HFEngine(model, tokenizer, max_batch_size=batch_size)
    agent = Agent(AgentSpec(tools, environment_factory), tokenizer, num_generations=1,
                  max_completion_length=max_new_tokens, max_tool_calling_iterations=max_tool_calling_iterations)
    rollout, _ = agent.rollout(None, engine, rows, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                               default_stop_token_ids(tokenizer, model, end_of_turn=True))
    scores = accuracy_reward(None, rollout.messages, [str(r["answer"]) for r in rows])
    accuracy = sum(scores) / len(scores)
    if return_samples:
        return accuracy, [(r["prompt"], m, s == 1.0) for r, m, s in zip(rows, rollout.messages, scores)]
    return accuracy


class ExactMatchCallback(TrainerCallback):
    """Measures held-out exact match every `every_steps` optimizer steps (and at the last step) during
    training and records it in the trainer's log history under `key` (so `trainer_state.json`, the
    quickstart's plots and `posttrain report` show the accuracy curve next to the loss or reward).

    It decodes greedily on the model being trained (unwrapped), in the main process only."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, dataset: Any, every_steps: int,
                 key: str = "heldout_exact_match", max_new_tokens: int = 64, batch_size: int = 100):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.tokenizer, self.dataset, self.every_steps, self.key = tokenizer, dataset, every_steps, key
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _measure(self, state: Any, model: Any) -> None:
        from ..ops.wrappers import unwrap_model

        if not state.is_world_process_zero or any(e.get("step") == state.global_step and self.key in e
                                                   for e in state.log_history):
            return
        value = exact_match(unwrap_model(model, strip_peft=False), self.tokenizer, self.dataset,
                            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        state.log_history.append({self.key: value, "step": state.global_step})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._measure(state, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every_steps == 0 or state.global_step >= state.max_steps:
            self._measure(state, model)
