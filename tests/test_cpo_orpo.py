"""CPO / SimPO and ORPO trainers: reference-free (one model only), metrics, bad rows, and (slow) learning."""
import pytest
import torch

from posttrain import CPOConfig, CPOTrainer, ORPOConfig, ORPOTrainer
from posttrain.data import DatasetFormatError
from posttrain.losses import chosen_nll, cpo_loss, orpo_loss
from posttrain.models import build_tiny
from posttrain.tasks import ArithmeticTask
from posttrain.trainers._preference import sequence_logps

from _pref_helpers import WEAK_SFT_STEPS, llama_count, make_args, cache_dir, sft_base, train_and_measure


@pytest.fixture(scope="module")
def data():
    return ArithmeticTask(digits=2).preference(16)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_loss_is_the_pure_function_plus_nll(tmp_path, data, loss_type):
    baseline = llama_count()
    model, tok = build_tiny("nano", seed=0)
    args = make_args(CPOConfig, tmp_path, loss_type=loss_type, cpo_alpha=0.7, simpo_gamma=0.3, beta=0.5)
    trainer = CPOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.ref_model is None and llama_count() == baseline + 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        got = trainer.compute_loss(model, batch).item()
        out = sequence_logps(model, batch)
    lc, lr = out.lengths[:4], out.lengths[4:]
    losses, _ = cpo_loss(out.logps[:4], out.logps[4:], beta=0.5, loss_type=loss_type, simpo_gamma=0.3,
                         chosen_lengths=lc, rejected_lengths=lr)
    assert got == pytest.approx((losses.mean() + 0.7 * chosen_nll(out.logps[:4], lc)).item(), rel=1e-5)
    trainer.train()
    assert {"rewards/accuracies", "nll_loss", "logps/chosen"} <= set(trainer.state.log_history[0])


def test_orpo_loss_and_training(tmp_path, data):
    baseline = llama_count()
    model, tok = build_tiny("nano", seed=0)
    trainer = ORPOTrainer(model, args=make_args(ORPOConfig, tmp_path, beta=0.2), train_dataset=data,
                          processing_class=tok)
    assert trainer.ref_model is None and llama_count() == baseline + 1
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        got = trainer.compute_loss(model, batch).item()
        out = sequence_logps(model, batch)
    losses, _ = orpo_loss(out.logps[:4], out.logps[4:], out.lengths[:4], out.lengths[4:], beta=0.2)
    assert got == pytest.approx((chosen_nll(out.logps[:4], out.lengths[:4]) + losses.mean()).item(), rel=1e-5)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "rewards/margins"} <= set(logged)


@pytest.mark.parametrize("cls,config", [(CPOTrainer, CPOConfig), (ORPOTrainer, ORPOConfig)])
def test_bad_rows_name_row_and_field(tmp_path, cls, config):
    rows = ArithmeticTask(digits=2).preference(5).to_list()
    rows[2]["rejected"] = None
    model, tok = build_tiny("nano", seed=0)
    with pytest.raises(DatasetFormatError, match=r"row 2, field 'rejected'"):
        cls(model, args=make_args(config, tmp_path), train_dataset=rows, processing_class=tok)
    rows = ArithmeticTask(digits=2).preference(5).to_list()
    del rows[4]["chosen"]
    with pytest.raises(DatasetFormatError, match=r"row 4, field 'chosen'"):
        cls(model, args=make_args(config, tmp_path), train_dataset=rows, processing_class=tok)


def test_config_validation():
    with pytest.raises(ValueError, match="loss_type"):
        CPOConfig(output_dir="x", loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        ORPOConfig(output_dir="x", beta=0.0)


@pytest.fixture(scope="module")
def sft_tiny(request, tmp_path_factory):
    return sft_base(cache_dir(request, tmp_path_factory), steps=WEAK_SFT_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("cls,config,average,kw", [
    (CPOTrainer, CPOConfig, False, dict(beta=1.0, learning_rate=3e-5)),
    # SimPO at lr 3e-5 sat on the SFT start's 0.734 (0.727-0.734 held-out on an AMD EPYC VM, 1 or 2 threads);
    # at 2e-4 it reached 0.781 / 0.797 there. Without the NLL term (cpo_alpha=0) the tiny model's chosen
    # log-probs collapse (-12 -> -21) and held-out accuracy falls, as SimPO's paper warns for small models.
    (CPOTrainer, CPOConfig, True, dict(loss_type="simpo", cpo_alpha=0.5, beta=2.0, simpo_gamma=0.5,
                                       learning_rate=2e-4)),
    # ORPO at 1e-4 gained 2 pairs of 128 (0.750); at 2e-4, 0.773 / 0.766 on 1 / 2 threads (AMD EPYC VM).
    (ORPOTrainer, ORPOConfig, True, dict(beta=1.0, learning_rate=2e-4)),
], ids=["cpo", "simpo", "orpo"])
def test_reference_free_methods_learn_held_out_preferences(tmp_path, sft_tiny, cls, config, average, kw):
    """The implicit reward of these methods is the (per-token for SimPO/ORPO) log-likelihood itself, so the
    SFT-ed start already ranks most held-out pairs right: training must rank more of them right."""
    model, tok = sft_tiny
    before, after = train_and_measure(cls, config, model, tok, tmp_path, reference=False, average=average,
                                      max_steps=150, **kw)
    assert after.accuracy > before.accuracy and after.accuracy >= 0.7
    assert after.chosen_logp > before.chosen_logp
