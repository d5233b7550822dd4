"""`posttrain quickstart` end to end with a tiny budget: both stages run, and the files the README
promises (model, loss-curve PNGs, results.json with accuracies and times) land in the output folder."""
import json

import pytest

from posttrain.cli import main


def test_quickstart_writes_model_curves_and_results(tmp_path):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--output_dir", str(out), "--model", "tiny:nano", "--train_size", "64",
               "--test_size", "8", "--sft_size", "32", "--sft_steps", "4", "--grpo_steps", "2", "--grpo_batch_size", "8",
               "--grpo_generations", "4", "--curve_size", "4", "--curve_points", "2"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"before", "after_sft", "after_grpo"}
    assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())
    assert results["seconds"]["total"] > 0 and results["grpo_reward_last_log"] is not None
    for name in ("sft_loss_curve.png", "grpo_loss_curve.png", "quickstart_curves.png", "model/config.json"):
        assert (out / name).is_file(), name
    assert (out / "sft_loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # held-out exact match is measured through each stage (before it and every steps // curve_points steps)
    history = results["history"]
    assert [e["step"] for e in history["sft"] if "heldout_exact_match" in e] == [0, 2, 4]
    assert [e["step"] for e in history["grpo"] if "heldout_exact_match" in e] == [0, 1, 2]
    assert any("rewards/arithmetic/mean" in e for e in history["grpo"])


def test_stage_split_gives_sft_and_grpo_disjoint_problems_and_the_same_held_out_set():
    from posttrain.quickstart import QuickstartOptions, stage_split
    from posttrain.tasks import ArithmeticTask

    task = ArithmeticTask(digits=2, seed=0)
    opts = QuickstartOptions(train_size=40, test_size=10, sft_size=30, grpo_batch_size=16, grpo_generations=4)
    sft_train, sft_test = stage_split(task, opts, "prompt_completion", "sft")
    grpo_train, grpo_test = stage_split(task, opts, "prompt_only", "grpo")
    assert len(sft_train) == 30 and len(grpo_train) == 10
    assert not set(sft_train["prompt"]) & set(grpo_train["prompt"])
    assert sft_test["prompt"] == grpo_test["prompt"]
    # Fewer prompts left than one GRPO batch needs (64 / 4 = 16 > 10): GRPO falls back to every train problem.
    few = QuickstartOptions(train_size=40, test_size=10, sft_size=30, grpo_batch_size=64, grpo_generations=4)
    assert len(stage_split(task, few, "prompt_only", "grpo")[0]) == 40
    everything = QuickstartOptions(train_size=40, test_size=10, sft_size=0)
    assert len(stage_split(task, everything, "prompt_completion", "sft")[0]) == 40


@pytest.mark.slow
def test_quickstart_defaults_every_stage_raises_held_out_exact_match(tmp_path):
    """The README's command on seed 0: SFT lifts the untrained model, and GRPO (rewarded only for the right
    answer) lifts the SFT model by at least 10 points of held-out exact match. Several minutes: the whole
    quickstart, as a user runs it."""
    import torch

    from posttrain.quickstart import QuickstartOptions, run_quickstart

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_quickstart(QuickstartOptions(output_dir=str(tmp_path / "qs"), seed=0))
    finally:
        torch.set_num_threads(before)
    acc = results["accuracy"]
    assert acc["after_sft"] > acc["before"] + 0.05
    assert acc["after_grpo"] >= acc["after_sft"] + 0.10, acc
    assert (tmp_path / "qs" / "quickstart_curves.png").is_file()

