"""The command line: YAML plus flag overrides, --help listing every field, env, and a real end-to-end run; the
run file's forms, types and env: block, local splits, the final eval in the report, TRL's reward names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _data_helpers import qa_rows, train_test_folder, write_jsonl

from posttrain.cli import main, parse_method_args, run_method


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: tiny:nano\nlearning_rate: 0.01\nmax_steps: 100\nmax_length: 99\n")
    script, config = parse_method_args("sft", ["--config", str(cfg), "--max_steps", "3", "--output_dir", str(tmp_path)])
    assert script.model_name_or_path == "tiny:nano"
    assert config.learning_rate == 0.01 and config.max_length == 99  # from YAML
    assert config.max_steps == 3  # flag wins


def test_unknown_yaml_field_is_an_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rat: 0.01\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        parse_method_args("sft", ["--config", str(cfg)])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    for flag in ("--dataset_text_field", "--padding_free", "--loss_type", "--model_name_or_path", "--use_peft",
                 "--gradient_accumulation_steps", "--report_to", "--config"):
        assert flag in out
    assert "dynamic fine-tuning" in out


def test_usage_and_env(capsys):
    assert main([]) == 0
    assert "sft" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out
    assert main(["nosuchmethod"]) == 2


def test_sft_end_to_end_subprocess(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model_name_or_path: tiny:nano\ndataset_name: task:arithmetic\ntask_train_size: 64\ntask_test_size: 16\n"
        "max_steps: 50\nper_device_train_batch_size: 8\nlearning_rate: 0.003\nlogging_steps: 1\n"
        "save_strategy: 'no'\nreport_to: none\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "sft", "--config", str(cfg), "--max_steps", "4", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "posttrain sft: 4 steps" in proc.stdout
    assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "tokenizer.json")
    assert json.load(open(out / "trainer_state.json"))["global_step"] == 4
    report = subprocess.run([sys.executable, "-m", "posttrain.cli", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0 and "loss=" in report.stdout and os.path.exists(out / "curves.png")


# ------------------------------------------------------------------------------------- the run file (issue 26)
def _yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_equals_form_loads_the_file(tmp_path):
    cfg = _yaml(tmp_path, "model_name_or_path: tiny:nano\nlearning_rate: 0.01\nmax_steps: 7\nmax_length: 99\n"
                          f"output_dir: {tmp_path / 'out'}\n")
    spaced = parse_method_args("sft", ["--config", str(cfg)])
    joined = parse_method_args("sft", [f"--config={cfg}"])
    script, config = joined
    assert script.model_name_or_path == "tiny:nano"
    assert (config.learning_rate, config.max_steps, config.max_length) == (0.01, 7, 99)
    assert config.output_dir == str(tmp_path / "out")
    assert (spaced[0], spaced[1].to_dict()) == (joined[0], joined[1].to_dict())
    _, flagged = parse_method_args("sft", [f"--config={cfg}", "--max_steps=3"])
    assert (flagged.max_steps, flagged.learning_rate) == (3, 0.01)  # the flag wins, the file still counts


def test_config_flag_misuse_is_an_error(tmp_path):
    cfg = _yaml(tmp_path, "max_steps: 3\n")
    with pytest.raises(SystemExit, match="--config given 2 times"):
        parse_method_args("sft", [f"--config={cfg}", "--config", str(cfg)])
    with pytest.raises(SystemExit, match="--config needs a file path"):
        parse_method_args("sft", ["--config="])
    with pytest.raises(SystemExit, match="does not exist"):
        parse_method_args("sft", [f"--config={tmp_path / 'missing.yaml'}"])


def test_yaml_value_of_the_wrong_type_is_an_error_naming_field_value_and_type(tmp_path):
    cfg = _yaml(tmp_path, "max_steps: 2.5\n")
    with pytest.raises(SystemExit, match=r"max_steps: 2\.5 \(float\) is not an integer \(field max_steps of SFTConfig\)"):
        parse_method_args("sft", ["--config", str(cfg)])
    cfg = _yaml(tmp_path, "save_strategy: off\nuse_peft: maybe\nlearning_rate: fast\nlora_r: [4]\n"
                          "lr_scheduler_type: true\nreward_weights: [1, x]\n")
    with pytest.raises(SystemExit) as err:
        parse_method_args("grpo", ["--config", str(cfg)])
    message = str(err.value)
    assert "6 bad values" in message
    for part in ("save_strategy: 'off' (str) is not one of 'no', 'steps', 'epoch', 'best'",
                 "use_peft: 'maybe' (str) is not a boolean (true/false) (field use_peft of ScriptArguments)",
                 "learning_rate: 'fast' (str) is not a number", "lora_r: [4] (list) is not an integer",
                 "lr_scheduler_type: True (bool) is not one of 'linear'", "reward_weights: [1, 'x'] (list)"):
        assert part in message


def test_yaml_no_is_the_string_for_strategies_and_false_for_bools(tmp_path):
    cfg = _yaml(tmp_path, "save_strategy: no\neval_strategy: no\nlogging_strategy: steps\nuse_peft: no\n"
                          "gradient_checkpointing: yes\nbf16: off\nlearning_rate: 1e-4\nmax_steps: 3.0\n"
                          "report_to: none\nlogging_steps: '5'\n")
    script, config = parse_method_args("sft", ["--config", str(cfg)])
    assert str(config.save_strategy.value) == "no" and str(config.eval_strategy.value) == "no"
    assert script.use_peft is False and config.gradient_checkpointing is True and config.bf16 is False
    assert config.learning_rate == 1e-4 and config.max_steps == 3 and isinstance(config.max_steps, int)
    assert config.report_to == [] and config.logging_steps == 5


def test_yaml_env_block_is_read_and_checked(tmp_path):
    cfg = _yaml(tmp_path, "max_steps: 3\nenv:\n  POSTTRAIN_TEST_A: no\n  POSTTRAIN_TEST_B: 3\n")
    _, config = parse_method_args("sft", ["--config", str(cfg)])  # env: is not a config field
    assert config.max_steps == 3 and "POSTTRAIN_TEST_A" not in os.environ  # parsing sets nothing
    from posttrain.cli_config import read_run_file

    assert read_run_file(str(cfg)).env == {"POSTTRAIN_TEST_A": "no", "POSTTRAIN_TEST_B": "3"}
    with pytest.raises(SystemExit, match="env must be a mapping"):
        parse_method_args("sft", ["--config", str(_yaml(tmp_path, "env: [A, B]\n", "bad.yaml"))])
    with pytest.raises(SystemExit, match="POSTTRAIN_TEST_C: \\{'x': 1\\} is not a string or number"):
        parse_method_args("sft", ["--config", str(_yaml(tmp_path, "env: {POSTTRAIN_TEST_C: {x: 1}}\n", "b2.yaml"))])


def test_eval_strategy_without_an_eval_set_is_an_error_before_training(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    with pytest.raises(SystemExit, match="eval_strategy='steps' needs an evaluation set"):
        run_method("sft", ["--dataset_name", str(path), "--eval_strategy", "steps", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "trainer_state.json").exists()


_TINY_SFT = ("model_name_or_path: tiny:nano\nper_device_train_batch_size: 2\nper_device_eval_batch_size: 1\n"
             "learning_rate: 1.0e-3\nlogging_steps: 1\nsave_strategy: no\nreport_to: none\nmax_length: 32\n")


def test_cli_folder_splits_train_10_eval_3_and_report_shows_final_eval(tmp_path, capsys):
    folder = train_test_folder(tmp_path / "data")
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, _TINY_SFT + f"dataset_name: {folder}\nnum_train_epochs: 1\noutput_dir: {out}\n")
    metrics = run_method("sft", [f"--config={cfg}"])
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 5  # 10 training rows / 2 (the 13 rows together would take 7 steps)
    assert "eval_loss" in metrics
    assert json.load(open(out / "all_results.json"))["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert state["log_history"][-1]["eval_loss"] == pytest.approx(metrics["eval_loss"])  # saved after evaluate()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final eval (step 5): ")]
    assert len(shown) == 1 and f"eval_loss={metrics['eval_loss']:.4g}" in shown[0]


def test_cli_one_local_file_trains_without_eval(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", qa_rows(10))
    out = tmp_path / "run"
    cfg = _yaml(tmp_path, _TINY_SFT + f"dataset_name: {path}\nmax_steps: 2\noutput_dir: {out}\n")
    metrics = run_method("sft", ["--config", str(cfg)])
    assert "train_loss" in metrics and not any(k.startswith("eval_") for k in metrics)
    assert not (out / "eval_results.json").exists()
    assert not any(k.startswith("eval_") for e in json.load(open(out / "trainer_state.json"))["log_history"] for k in e)
    capsys.readouterr()
    assert main(["report", str(out)]) == 0 and "final eval" not in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"split 'test' not found.*'train'"):
        run_method("sft", ["--config", str(cfg), "--dataset_test_split", "test"])


# ----------------------------------------------------------------------------------- TRL's reward names
def test_trl_reward_names_and_reward_model_alias():
    from posttrain.trainers._online_config import reward_trainer_kwargs

    _, rewards, _ = parse_method_args("grpo", [
        "--reward_funcs", "accuracy_reward", "reasoning_accuracy_reward", "think_format_reward",
        "get_soft_overlong_punishment", "arithmetic", "--reward_model_name_or_path", "tiny:nano"])
    assert rewards.reward_model_path == "tiny:nano"
    model, acc, reasoning, think, overlong, arithmetic = reward_trainer_kwargs(None, rewards)["reward_funcs"]
    assert model == "tiny:nano" and arithmetic == "arithmetic"  # the reward model first, as in TRL's CLI
    assert [f.__name__ for f in (acc, reasoning, think, overlong)] == [
        "accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "soft_overlong_punishment_reward"]
    third = [[{"role": "assistant", "content": c}] for c in (
        r"My answer is \boxed{\frac{1}{3}}", r"\boxed{\frac{1}{2}}", "The answer is 1/3",
        r"<think> r </think> so \boxed{\frac{1}{3}}", r"<think> partial \boxed{\frac{1}{3}}")]
    solution = [r"\frac{1}{3}"] * 5
    assert acc(None, third, None, solution=solution) == [1.0, 0.0, 0.0, 1.0, 1.0]  # LaTeX answers only
    assert reasoning(None, third, None, solution=solution) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert acc(None, third[:1], None, solution=["no math here ???"]) == [None]
    assert think(None, ["<think>\nreason\n</think>\nanswer", "<think>\nreason\nanswer", " <think>x</think>",
                        "<think>a<think>b</think>"]) == [1.0, 0.0, 0.0, 0.0]
    lengths = [1024, 1025, 1152, 1280, 1281]  # TRL's CLI: max_completion_len=1280, soft_punish_cache=256
    assert overlong(None, [""] * 5, [[0] * n for n in lengths]) == [0.0, -1 / 256, -0.5, -1.0, -1.0]
    _, alone, _ = parse_method_args("grpo", ["--reward_model_path", "tiny:nano"])
    assert reward_trainer_kwargs(None, alone)["reward_funcs"] == ["tiny:nano"]  # no default arithmetic added
    _, none_given, _ = parse_method_args("grpo", [])
    assert reward_trainer_kwargs(None, none_given)["reward_funcs"] == ["arithmetic"]


def test_unknown_reward_name_lists_the_known_ones():
    from posttrain.trainers._online_config import reward_trainer_kwargs

    _, rewards, _ = parse_method_args("grpo", ["--reward_funcs", "get_cosine_scaled_reward"])
    with pytest.raises(ValueError, match=r"unknown reward function 'get_cosine_scaled_reward'.*accuracy, .*"
                                         r"think_format.*accuracy_reward, get_soft_overlong_punishment"):
        reward_trainer_kwargs(None, rewards)


def test_cli_grpo_with_trl_reward_names_and_env_block(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_TEST_REWARD", "0.0")  # restored after the test; the run file overrides it
    out = tmp_path / "out"
    cfg = _yaml(tmp_path, (
        "model_name_or_path: tiny:nano\ntask_train_size: 16\ndataset_test_split: none\n"
        "reward_funcs: [think_format_reward, get_soft_overlong_punishment, _data_helpers:env_reward]\n"
        "num_generations: 2\nper_device_train_batch_size: 4\nmax_completion_length: 4\nmax_steps: 1\n"
        "logging_steps: 1\nreport_to: none\nsave_strategy: no\nlog_completions: false\n"
        f"output_dir: {out}\nenv:\n  POSTTRAIN_TEST_REWARD: 0.75\n"))
    assert main(["grpo", f"--config={cfg}"]) == 0
    assert os.environ["POSTTRAIN_TEST_REWARD"] == "0.75"
    assert "env from" in capsys.readouterr().err
    logged = json.load(open(out / "trainer_state.json"))["log_history"][0]
    assert logged["rewards/env_reward/mean"] == pytest.approx(0.75)  # the reward function saw the env block
    assert logged["rewards/think_format_reward/mean"] == 0.0  # 4 random tokens never open and close <think>
    assert logged["rewards/soft_overlong_punishment_reward/mean"] == 0.0  # 4 tokens << 1280 - 256


def test_reward_model_path_is_the_config_field_of_ppo_and_the_online_preference_methods(tmp_path):
    """TRL's PPOConfig / OnlineDPOConfig / NashMD / XPO have reward_model_path: the same flag and YAML key fill the
    config (not a script argument), and the trainer loads it (first, before any reward function)."""
    from posttrain.trainers._online_config import reward_trainer_kwargs
    from posttrain.trainers._online_pref import preference_trainer_kwargs

    for method in ("ppo", "online_dpo", "nash_md", "xpo", "reinforce_pp"):
        script, rewards, *rest, config = parse_method_args(method, ["--reward_model_name_or_path", "tiny:nano"])
        assert config.reward_model_path == "tiny:nano" and not hasattr(rewards, "reward_model_path")
        kwargs = (preference_trainer_kwargs(script, rewards, *rest, config) if rest else
                  reward_trainer_kwargs(script, rewards, config))
        assert kwargs == {"reward_funcs": None}  # the trainer loads it; no default arithmetic added
    cfg = _yaml(tmp_path, "reward_model_path: tiny:nano\nreward_funcs: [length]\n")
    script, rewards, judging, config = parse_method_args("online_dpo", ["--config", str(cfg)])
    assert config.reward_model_path == "tiny:nano" and rewards.reward_funcs == ["length"]
    with pytest.raises(ValueError, match="not both"):
        preference_trainer_kwargs(script, rewards, type(judging)(judge="rule:length"), config)


def test_trainers_load_the_configs_reward_model_first():
    from posttrain import OnlineDPOConfig, OnlineDPOTrainer, PPOConfig, PPOTrainer
    from posttrain.models import build_tiny
    from posttrain.online.reward_model import RewardModelScorer
    from posttrain.tasks import ArithmeticTask

    model, tok = build_tiny("nano")
    data = ArithmeticTask(digits=2).prompt_only(8)
    common = dict(output_dir="/tmp/posttrain-test-rmp", report_to="none", per_device_train_batch_size=8,
                  reward_model_path="tiny:nano")
    length = lambda completions, **kw: [float(len(c)) for c in completions]  # noqa: E731
    for trainer in (PPOTrainer(args=PPOConfig(**common), processing_class=tok, model=model, train_dataset=data,
                               reward_funcs=[length]),
                    OnlineDPOTrainer(model, args=OnlineDPOConfig(**common), train_dataset=data, processing_class=tok,
                                     reward_funcs=[length])):
        funcs = trainer.reward_composer.funcs
        assert len(funcs) == 2 and isinstance(funcs[0], RewardModelScorer) and funcs[1] is length
    with pytest.raises(ValueError, match="not both"):
        OnlineDPOTrainer(model, args=OnlineDPOConfig(**common), train_dataset=data, processing_class=tok,
                         judge=object())
