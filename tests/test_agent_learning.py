"""Tool use is learned, and it is what raises accuracy: SFT a tiny model on the lookup task's transcripts,
then GRPO it with the lookup environment; held-out accuracy with the tool must end above the SFT model's
and above the same trained model without the tool (which can only guess: the value is not in the prompt)."""

from __future__ import annotations

import time

import pytest

from posttrain import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from posttrain.data.templates import trainer_tokenizer
from posttrain.models import build_tiny
from posttrain.tasks.lookup import LookupEnv, LookupTask, agent_accuracy, lookup_accuracy

from _online_helpers import _one_thread  # noqa: F401  (autouse)


@pytest.mark.slow
def test_sft_then_grpo_with_the_tool_beats_sft_and_no_tool():
    start = time.perf_counter()
    model, tok = build_tiny("nano", seed=0)
    tok = trainer_tokenizer(tok, "chatml")[1]
    task = LookupTask(keys=4, seed=0)
    test = task.prompt_only(64, "test")
    common = dict(report_to="none", save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                  chat_template="chatml", logging_steps=10)
    sft = SFTTrainer(model, args=SFTConfig(output_dir="/tmp/posttrain-test-agent-sft", max_steps=100,
                                           per_device_train_batch_size=16, learning_rate=5e-3, padding_free=True,
                                           **common),
                     train_dataset=task.sft_transcripts(100 * 16), processing_class=tok)
    sft.train()
    sft_acc = agent_accuracy(sft.model, tok, test)
    args = GRPOConfig(output_dir="/tmp/posttrain-test-agent-grpo", max_steps=25, per_device_train_batch_size=32,
                      num_generations=8, max_completion_length=96, learning_rate=2e-3, beta=0.0,
                      max_tool_calling_iterations=2, log_completions=False, **common)
    grpo = GRPOTrainer(sft.model, lookup_accuracy, args, task.prompt_only(512, "train"), processing_class=tok,
                       environment_factory=LookupEnv)
    grpo.train()
    with_tool = agent_accuracy(grpo.model, tok, test)
    without_tool = agent_accuracy(grpo.model, tok, test, use_tool=False)
    rewards = [h["reward"] for h in grpo.state.log_history if "reward" in h]
    print(f"lookup held-out accuracy: SFT {sft_acc:.3f}, SFT+GRPO with the tool {with_tool:.3f}, without it "
          f"{without_tool:.3f}; GRPO reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; {time.perf_counter() - start:.0f} s")
    assert with_tool > sft_acc + 0.1
    assert with_tool > without_tool + 0.3
