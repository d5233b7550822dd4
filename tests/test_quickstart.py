"""`posttrain quickstart` end to end with a tiny budget: both stages run, and the files the README
promises (model, loss-curve PNGs, results.json with accuracies and times) land in the output folder."""
import json

from posttrain.cli import main


def test_quickstart_writes_model_curves_and_results(tmp_path):
    out = tmp_path / "qs"
    rc = main(["quickstart", "--output_dir", str(out), "--model", "tiny:nano", "--train_size", "64",
               "--test_size", "8", "--sft_size", "32", "--sft_steps", "4", "--grpo_steps", "2", "--grpo_batch_size", "8",
               "--grpo_generations", "4"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"before", "after_sft", "after_grpo"}
    assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())
    assert results["seconds"]["total"] > 0 and results["grpo_reward_last_log"] is not None
    for name in ("sft_loss_curve.png", "grpo_loss_curve.png", "model/config.json"):
        assert (out / name).is_file(), name
    assert (out / "sft_loss_curve.png").read_bytes()[:4] == b"\x89PNG"
