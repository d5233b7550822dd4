"""The command line: YAML plus flag overrides, --help listing every field, env, and a real end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from posttrain.cli import main, parse_method_args


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
