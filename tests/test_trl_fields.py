"""TRL 1.16's fields and constructor arguments do what TRL documents (or warn that they cannot, once)."""

from __future__ import annotations

import logging

import pytest
import torch

from posttrain import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer
from posttrain.cli import parse_method_args
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask
from posttrain.trainers._compat import disable_dropout_in_model

from _online_helpers import _one_thread, digit_share, scored_with  # noqa: F401  (_one_thread: autouse)


def _online(cls, config_cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_completion_length=4,
                max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    base.update(kw)
    model, tok = build_tiny("nano")
    return cls(model, digit_share, config_cls(**base), train_dataset=ArithmeticTask(digits=2).prompt_only(16),
               processing_class=tok)


def test_inapplicable_fields_warn_once_at_construction(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="posttrain.trainers._compat"):
        _online(GRPOTrainer, GRPOConfig, tmp_path, vllm_tensor_parallel_size=2, ds3_gather_for_generation=False)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("vllm_tensor_parallel_size=2 has no effect" in m for m in messages) == 1
    assert sum("ds3_gather_for_generation=False has no effect" in m for m in messages) == 1
    assert not any("vllm_enable_sleep_mode" in m for m in messages)  # left at its default: no warning


def test_generation_kwargs_override_sampling_and_shuffle_dataset(tmp_path) -> None:
    trainer = _online(GRPOTrainer, GRPOConfig, tmp_path, generation_kwargs={"top_k": 5, "max_tokens": 3},
                      shuffle_dataset=False)
    params = trainer.sampling_params("train")
    assert params.top_k == 5 and params.max_new_tokens == 3 and params.temperature == 1.0
    trainer.get_train_dataloader()
    assert trainer._prompts._epoch_order() == list(range(16))  # dataset order kept
    with pytest.raises(ValueError, match="generation_kwargs: unsupported keys"):
        GRPOConfig(output_dir=str(tmp_path), generation_kwargs={"beam_width": 2})


@pytest.mark.parametrize("cls,config_cls", [(GRPOTrainer, GRPOConfig), (RLOOTrainer, RLOOConfig)])
def test_num_generations_eval_sets_the_completions_per_prompt_at_evaluation(tmp_path, cls, config_cls) -> None:
    seen = []

    def counting(prompts, completions, **kwargs):
        seen.append((len(prompts), len(set(map(str, prompts)))))
        return [0.0] * len(completions)

    model, tok = build_tiny("nano")
    for n_eval in (1, 2):
        seen.clear()
        args = config_cls(output_dir=str(tmp_path), num_generations=4, num_generations_eval=n_eval,
                          per_device_train_batch_size=8, per_device_eval_batch_size=4, max_completion_length=4,
                          report_to="none", save_strategy="no", disable_tqdm=True)
        trainer = cls(model, counting, args, train_dataset=ArithmeticTask(digits=2).prompt_only(8),
                      eval_dataset=ArithmeticTask(digits=2, seed=1).prompt_only(8), processing_class=tok)
        assert trainer.sampling_params("train").n == 4 and trainer.sampling_params("eval").n == n_eval
        metrics = trainer.evaluate()
        assert seen and all(total == prompts * n_eval for total, prompts in seen)  # n_eval per prompt
        assert sum(prompts for _, prompts in seen) == 8 and all(total == 4 for total, _ in seen)
        assert "eval_loss" in metrics and metrics["eval_loss"] == metrics["eval_loss"]  # finite, not nan


def test_chat_template_kwargs_reach_the_template(tmp_path) -> None:
    model, tok = build_tiny("nano")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if flag is defined and flag %} FLAG{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(8)]
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, report_to="none",
                      chat_template_kwargs={"flag": True}, max_completion_length=4)
    trainer = GRPOTrainer(model, digit_share, args, train_dataset=rows, processing_class=tok)
    assert tok.decode(trainer.train_dataset[0]["prompt_ids"]).endswith("FLAG")


def test_rloo_reward_clip_range_clips_before_the_baseline(tmp_path) -> None:
    trainer = _online(RLOOTrainer, RLOOConfig, tmp_path, beta=0.0, reward_clip_range=(-1.0, 1.0))
    scored = scored_with(torch.tensor([5.0, 0.0, -3.0, 1.0]), num_generations=4)

    class Batch:
        completion_mask = torch.ones(4, 2)

    adv, _ = trainer.compute_advantages(scored, Batch())
    clipped = [1.0, 0.0, -1.0, 1.0]
    expected = [r - (sum(clipped) - r) / 3 for r in clipped]
    assert torch.allclose(adv, torch.tensor(expected))


def test_disable_dropout_zeroes_modules_and_config_rates() -> None:
    model, _ = build_tiny("nano")
    model.config.attention_dropout = 0.1
    model.extra = torch.nn.Dropout(0.3)
    assert disable_dropout_in_model(model) >= 2
    assert model.extra.p == 0.0 and model.config.attention_dropout == 0.0


def _sft(tmp_path, rows, **kw):
    model, tok = build_tiny("nano")
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, **kw)
    return SFTTrainer(model, args, train_dataset=rows, processing_class=tok), tok


def test_sft_packing_strategies_and_truncation_mode(tmp_path) -> None:
    rows = [{"text": "a b c d e f g h i j k l m n o p " * (i + 1)} for i in range(4)]
    wrapped, _ = _sft(tmp_path, rows, packing=True, packing_strategy="wrapped", max_length=16)
    lengths = [len(r) for r in wrapped.train_dataset["input_ids"]]
    assert all(n == 16 for n in lengths[:-1]) and sum(lengths) > 4 * 16  # nothing cut away
    bfd, _ = _sft(tmp_path, rows, packing=True, packing_strategy="bfd", max_length=16)
    split, _ = _sft(tmp_path, rows, packing=True, packing_strategy="bfd_split", max_length=16)
    assert sum(map(len, split.train_dataset["input_ids"])) == sum(lengths) > sum(map(len, bfd.train_dataset["input_ids"]))
    start, tok = _sft(tmp_path, rows[3:], max_length=8)
    end, _ = _sft(tmp_path, rows[3:], max_length=8, truncation_mode="keep_end")
    whole, _ = _sft(tmp_path, rows[3:], max_length=None)
    full = whole.train_dataset[0]["input_ids"]
    assert len(full) > 8
    assert start.train_dataset[0]["input_ids"] == full[:8] and end.train_dataset[0]["input_ids"] == full[-8:]


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_sft_pad_to_multiple_of_rounds_the_batch_and_leaves_the_loss(tmp_path, padding_free) -> None:
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i} " * (i + 1)} for i in range(4)]
    losses = []
    for multiple in (None, 64):
        trainer, _ = _sft(tmp_path, rows, padding_free=padding_free, pad_to_multiple_of=multiple,
                          per_device_train_batch_size=4)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        width = batch["input_ids"].shape[1]
        assert width % 64 == 0 if multiple else width % 64 != 0
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, batch)))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_sft_eval_packing_and_dataset_kwargs(tmp_path) -> None:
    rows = [{"text": "hello world " * 3} for _ in range(6)]
    model, tok = build_tiny("nano")
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", packing=True, eval_packing=False, max_length=64)
    trainer = SFTTrainer(model, args, train_dataset=rows, eval_dataset=rows, processing_class=tok)
    assert len(trainer.train_dataset) < 6 and len(trainer.eval_dataset) == 6
    tokenized = [{"input_ids": tok(r["text"])["input_ids"]} for r in rows]
    skip, _ = _sft(tmp_path, tokenized, dataset_kwargs={"skip_prepare_dataset": True})
    assert skip.train_dataset[0]["input_ids"] == tokenized[0]["input_ids"]
    with pytest.raises(Exception, match="skip_prepare_dataset=True needs a tokenized dataset"):
        _sft(tmp_path, rows, dataset_kwargs={"skip_prepare_dataset": True})


def test_sft_compute_loss_func_is_called_with_outputs_and_labels(tmp_path) -> None:
    seen = {}

    def loss_func(outputs, labels, num_items_in_batch=None):
        seen["shapes"] = (tuple(outputs.logits.shape[:2]), tuple(labels.shape))
        return outputs.logits.float().mean() * 0 + 1.0

    model, tok = build_tiny("nano")
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, padding_free=False,
                     save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model, args, train_dataset=[{"text": "one two three"}] * 8, processing_class=tok,
                         compute_loss_func=loss_func)
    trainer.train()
    assert seen["shapes"][0] == seen["shapes"][1]


def test_quantization_config_is_a_clear_error_without_bitsandbytes(tmp_path) -> None:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed: the error path does not apply")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="bitsandbytes"):
        SFTTrainer("tiny:nano", SFTConfig(output_dir=str(tmp_path), report_to="none"),
                   quantization_config=BitsAndBytesConfig(load_in_4bit=True))


def test_cli_takes_the_new_fields() -> None:
    *_, grpo = parse_method_args("grpo", ["--sapo_temperature_neg", "1.3", "--generation_kwargs", '{"top_k": 5}',
                                          "--vllm_importance_sampling_mode", "sequence_mask",
                                          "--pad_to_multiple_of", "8", "--loss_type", "vespo"])
    assert grpo.sapo_temperature_neg == 1.3 and grpo.generation_kwargs == {"top_k": 5}
    assert grpo.importance_sampling_mode == "mask" and grpo.pad_to_multiple_of == 8 and grpo.loss_type == "vespo"
    *_, sft = parse_method_args("sft", ["--packing_strategy", "wrapped", "--pad_to_multiple_of", "auto"])
    assert sft.packing_strategy == "wrapped" and sft.pad_to_multiple_of is None
    *_, rloo = parse_method_args("rloo", ["--reward_clip_range", "-1", "1"])
    assert rloo.reward_clip_range == (-1.0, 1.0)
    *_, dpo = parse_method_args("dpo", ["--f_divergence_type", "js_divergence", "--sync_ref_model", "true"])
    assert dpo.f_divergence_type == "js_divergence" and dpo.sync_ref_model


@pytest.mark.slow
@pytest.mark.parametrize("overrides, metric", [
    ({"loss_type": "vespo", "num_iterations": 2}, "vespo/phi_seq_mean"),
    ({"loss_type": "sapo", "num_iterations": 2, "off_policy_mask_threshold": 0.05}, "off_policy_masked_frac"),
    ({"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 9.0, "top_entropy_quantile": 0.5},
     "entropy_coef"),
])
def test_grpo_new_objectives_train_on_the_builtin_task(tmp_path, overrides, metric) -> None:
    """Two steps of each: finite losses, the objective's own metric logged (benchmarks/grpo_objectives_run.py
    runs them long enough to see the reward rise)."""
    trainer = _online(GRPOTrainer, GRPOConfig, tmp_path, max_steps=2, logging_steps=1, learning_rate=2e-2,
                      **overrides)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all(metric in h for h in logs)
    if overrides.get("use_adaptive_entropy"):  # entropy (about 7.6 nats) is below the target: the coefficient grows
        assert trainer.entropy_coef == pytest.approx(0.01 + 2 * 0.005)
