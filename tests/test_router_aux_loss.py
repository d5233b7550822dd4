"""A mixture-of-experts model's router load-balancing loss (TRL's ``router_aux_loss_coef``): on by default with the
model's own coefficient, added to the method's loss, logged; off at 0; a warning for a dense model."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from transformers import MixtralConfig, MixtralForCausalLM

from posttrain import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from posttrain.models import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _moe(tok, coef: float = 0.05) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=coef, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    return MixtralForCausalLM(config)


def _sft(tok, tmp_path, coef):
    data = Dataset.from_list([{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to="none",
                     save_strategy="no", disable_tqdm=True, router_aux_loss_coef=coef, logging_steps=1)
    return SFTTrainer(model=_moe(tok), args=args, train_dataset=data, processing_class=tok)


def test_sft_adds_the_router_loss_with_the_models_own_coefficient(tok, tmp_path):
    on, off = _sft(tok, tmp_path / "on", None), _sft(tok, tmp_path / "off", 0.0)
    assert on.model.config.output_router_logits and not off.model.config.output_router_logits
    batch = on._prepare_inputs(next(iter(on.get_train_dataloader())))
    with torch.no_grad():
        loss_off = off.compute_loss(off.model, batch)
    loss_on = on.compute_loss(on.model, batch)  # with gradients: the router loss is recorded
    aux = on._metrics["train"]["aux_loss"][-1]
    assert aux > 0
    assert float(loss_on.detach()) == pytest.approx(float(loss_off) + 0.05 * aux, rel=1e-5)
    loss_on.backward()
    gate = on.model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    on.train()
    assert any("aux_loss" in h for h in on.state.log_history)


def test_an_explicit_coefficient_wins_and_dpo_gets_it_too(tok, tmp_path):
    rows = [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": " 7"} for i in range(4)]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", disable_tqdm=True, router_aux_loss_coef=0.5, logging_steps=1)
    trainer = DPOTrainer(model=_moe(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.model.config.router_aux_loss_coef == 0.5
    trainer.train()
    assert any("aux_loss" in h for h in trainer.state.log_history)


def test_a_dense_model_warns_and_trains_without_it(tok, tmp_path, caplog):
    data = Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}] * 4)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", disable_tqdm=True, router_aux_loss_coef=0.1)
    with caplog.at_level(logging.WARNING):
        trainer = SFTTrainer(model="tiny:nano", args=args, train_dataset=data)
    assert "not a mixture-of-experts model" in caplog.text
    trainer.train()
    assert not any("aux_loss" in h for h in trainer.state.log_history)
