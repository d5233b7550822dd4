"""The reference policy a caller gives (issue 26): used under PEFT too (it may be another checkpoint than the
LoRA base), by DPO, KTO, BCO and the online trainers; and a ref_model that is the policy itself is refused up
front with the fix named, instead of freezing the policy and failing at the first backward."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig

from posttrain import BCOConfig, BCOTrainer, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask
from posttrain.trainers._preference import sequence_logps
from posttrain.trainers.grpo import GRPOConfig, GRPOTrainer

from _online_helpers import _one_thread, digit_share  # noqa: F401  (_one_thread: autouse)
from _pref_helpers import make_args

TRAINERS = {"dpo": (DPOTrainer, DPOConfig), "kto": (KTOTrainer, KTOConfig), "bco": (BCOTrainer, BCOConfig)}


@pytest.fixture(scope="module")
def pairs():
    return ArithmeticTask(digits=2).preference(8)


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(4)]
    return trainer._prepare_input(trainer.data_collator(rows))


@pytest.mark.parametrize("method", sorted(TRAINERS))
def test_explicit_ref_model_is_used_under_peft(tmp_path, pairs, method):
    trainer_cls, config_cls = TRAINERS[method]
    policy, tok = build_tiny("nano", seed=0)
    other, _ = build_tiny("nano", seed=1)  # another checkpoint than the LoRA base
    expected_ref = copy.deepcopy(other)
    trainer = trainer_cls(policy, ref_model=other, args=make_args(config_cls, tmp_path), train_dataset=pairs,
                          processing_class=tok, peft_config=_lora())
    assert trainer.ref_model is not None
    batch = _batch(trainer)
    got = trainer.reference_forward(batch)
    base, _ = build_tiny("nano", seed=0)
    with torch.no_grad():
        want = sequence_logps(expected_ref, batch).logps
        base_logps = sequence_logps(base, batch).logps
    assert torch.allclose(got, want, atol=1e-4)  # the given model's log-probs ...
    assert not torch.allclose(got, base_logps, atol=1e-2)  # ... not the base's with adapters off (before)
    trainer.train()  # and the policy (its adapters) still trains
    assert trainer.state.global_step == 2


def test_ref_model_given_as_a_folder_is_loaded_and_used_under_peft(tmp_path, pairs):
    other, tok = build_tiny("nano", seed=1)
    other.save_pretrained(tmp_path / "ref")
    policy, _ = build_tiny("nano", seed=0)
    trainer = DPOTrainer(policy, ref_model=str(tmp_path / "ref"), args=make_args(DPOConfig, tmp_path),
                         train_dataset=pairs, processing_class=tok, peft_config=_lora())
    batch = _batch(trainer)
    with torch.no_grad():
        want = sequence_logps(other, batch).logps
    assert torch.allclose(trainer.reference_forward(batch), want, atol=1e-4)


def test_online_trainer_keeps_the_given_reference_under_peft():
    policy, tok = build_tiny("nano", seed=0)
    other, _ = build_tiny("nano", seed=1)
    args = GRPOConfig(output_dir="/tmp/posttrain-test-ref-grpo", num_generations=4, per_device_train_batch_size=8,
                      max_completion_length=4, max_steps=1, beta=0.1, report_to="none", save_strategy="no",
                      disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(policy, digit_share, args, train_dataset=ArithmeticTask(digits=2).prompt_only(8),
                          processing_class=tok, peft_config=_lora(), ref_model=other)
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(ref[n], p) for n, p in other.named_parameters())


@pytest.mark.parametrize("method", ["dpo", "kto"])
@pytest.mark.parametrize("peft", [False, True])
def test_ref_model_that_is_the_policy_is_refused_up_front(tmp_path, pairs, method, peft):
    trainer_cls, config_cls = TRAINERS[method]
    model, tok = build_tiny("nano", seed=0)
    make = functools.partial(trainer_cls, model, ref_model=model, args=make_args(config_cls, tmp_path),
                             train_dataset=pairs, processing_class=tok, peft_config=_lora() if peft else None)
    with pytest.raises(ValueError, match=r"same model as model.*ref_model=None.*copy\.deepcopy\(model\)"):
        make()
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def test_a_separate_copy_as_ref_model_trains(tmp_path, pairs):
    model, tok = build_tiny("nano", seed=0)
    trainer = DPOTrainer(model, ref_model=copy.deepcopy(model), args=make_args(DPOConfig, tmp_path),
                         train_dataset=pairs, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2 and all(p.requires_grad for p in model.parameters())


def test_sync_ref_model_with_peft_and_a_ref_model_is_refused(tmp_path, pairs):
    policy, tok = build_tiny("nano", seed=0)
    other, _ = build_tiny("nano", seed=1)
    with pytest.raises(ValueError, match="sync_ref_model with a PEFT policy"):
        DPOTrainer(policy, ref_model=other, args=make_args(DPOConfig, tmp_path, sync_ref_model=True),
                   train_dataset=pairs, processing_class=tok, peft_config=_lora())
