"""Shared pieces of the multi-turn / tool tests: a scripted engine and tools."""

from __future__ import annotations

from typing import Callable, Sequence

from posttrain.online.engines import Rollout, RolloutEngine, SamplingParams


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def call(name: str, **arguments) -> str:
    """The Hermes tool-call text a model writes."""
    import json
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


class ScriptedEngine(RolloutEngine):
    """An engine that answers each prompt with ``script(turn, prompt_text)`` (plus the end-of-turn token),
    where ``turn`` counts the tool results already in the prompt; log-probs are -0.01 * (position + 1) so a
    test can see they stay aligned with their tokens. Records every request."""

    samples_from_policy = True

    def __init__(self, tokenizer, script: Callable[[int, str], str], end: str = "<|im_end|>") -> None:
        super().__init__()
        self.tokenizer, self.script, self.end = tokenizer, script, end
        self.requests: list[list[list[int]]] = []
        self.produced: list[list[int]] = []

    def generate(self, prompts: Sequence, params: SamplingParams) -> Rollout:
        self.requests.append([list(p) for p in prompts])
        out = Rollout()
        end_id = self.tokenizer.convert_tokens_to_ids(self.end)
        for i, p in enumerate(prompts):
            text = self.tokenizer.decode(p)
            turn = text.count("<|im_start|>tool")
            body = self.tokenizer(self.script(turn, text), add_special_tokens=False)["input_ids"]
            ids = (body + [end_id])[:params.max_new_tokens]
            for _ in range(params.n):
                out.prompt_index.append(i)
                out.prompt_ids.append(list(p))
                out.completion_ids.append(ids)
                out.texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
                out.logprobs.append([-0.01 * (t + 1) for t in range(len(ids))])
                out.truncated.append(ids[-1] != end_id)
                self.produced.append(ids)
        return out


MEMO_PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def memorized_tool_model(spec: str = "nano", steps: int = 60, seed: int = 0, lr: float = 3e-3):
    """A tiny model (and a chatml tokenizer) trained to answer `MEMO_PROMPT` by calling ``add(a=2, b=3)`` and,
    once the tool said 5, answering ``<answer>5</answer>``: a real model for the engines that cannot be
    scripted (vLLM, the rollout server). Trained on exactly the token sequence the multi-turn loop builds."""
    import torch

    from posttrain.data.templates import trainer_tokenizer
    from posttrain.models import build_tiny
    from posttrain.online.multiturn import Agent, AgentSpec

    torch.manual_seed(seed)
    model, tok = build_tiny(spec, seed=seed)
    tok = trainer_tokenizer(tok, "chatml")[1]
    agent = Agent(AgentSpec([add]), tok, num_generations=1, max_completion_length=256)
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    prompt = agent._start({"prompt": MEMO_PROMPT}, {}).prompt_ids
    turn1 = tok(call("add", a=2, b=3), add_special_tokens=False)["input_ids"] + end
    suffix = agent.tool_suffix_ids([{"role": "tool", "name": "add", "content": "5"}])
    turn2 = tok("<answer>5</answer>", add_special_tokens=False)["input_ids"] + end
    ids = prompt + turn1 + suffix + turn2
    labels = [-100] * len(prompt) + turn1 + [-100] * len(suffix) + turn2
    x, y = torch.tensor([ids]), torch.tensor([labels])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tok, {"prompt": prompt, "turn1": turn1, "suffix": suffix, "turn2": turn2, "loss": float(loss)}
