"""Gradient accumulation does not change the loss, in any offline trainer (issue 26, item 4).

One optimizer step over the same 3 rows of very different lengths, as one batch of 4 (it holds all 3) and as
batch 2 x accumulation 2 (micro-batches of 2 and 1, the unequal last micro-batch of an epoch): the logged
loss, the logged gradient norm and the parameter update (plain SGD, so the update is the gradient) must
agree to float tolerance. Token-mean losses (SFT, the NLL terms of RPO/CPO/ORPO, the PRM's per-step loss)
divide by the step's item count, per-row losses by the step's row count; dividing each micro-batch by its own
count instead (the bug: loss 6.2161 vs 6.1838 in the report) over-weights the short rows and the last,
smaller micro-batch.
"""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from posttrain import (
    BCOConfig, BCOTrainer, CPOConfig, CPOTrainer, DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, ORPOConfig,
    ORPOTrainer, PRMConfig, PRMTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer,
)
from posttrain.models import build_tiny

LONG = " and then it goes on for a good while, with many more words than the others have, before it stops"
PROMPTS = ["What is 1 + 1?", "Hi", "Name a color that the sky has on a clear summer day at noon, please."]

SFT_ROWS = [
    {"prompt": PROMPTS[0], "completion": " Two." + LONG},
    {"prompt": PROMPTS[1], "completion": " yo"},
    {"prompt": PROMPTS[2], "completion": " Blue, mostly" + LONG + LONG},
]
PAIRS = [
    {"prompt": PROMPTS[0], "chosen": " Two." + LONG, "rejected": " Three."},
    {"prompt": PROMPTS[1], "chosen": " yo", "rejected": " Hello there" + LONG},
    {"prompt": PROMPTS[2], "chosen": " Blue" + LONG + LONG, "rejected": " Green, I think."},
]
UNPAIRED = [
    {"prompt": PROMPTS[0], "completion": " Two." + LONG, "label": True},
    {"prompt": PROMPTS[1], "completion": " yo", "label": False},
    {"prompt": PROMPTS[2], "completion": " Blue" + LONG + LONG, "label": True},
]
STEPWISE = [
    {"prompt": PROMPTS[0], "completions": ["1+1=2.", "So" + LONG, "<answer>2</answer>"], "labels": [True, True, True]},
    {"prompt": PROMPTS[1], "completions": ["Hi."], "labels": [False]},
    {"prompt": PROMPTS[2], "completions": ["Blue" + LONG, "or red."], "labels": [True, False]},
]

COMMON = dict(max_steps=1, logging_steps=1, learning_rate=1e-2, optim="sgd", max_grad_norm=1e9, report_to="none",
              save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant", warmup_steps=0)


def one_step(out_dir, trainer_cls, config_cls, rows, batch_size, accumulation, **config):
    """Train one optimizer step; return the logged loss, the logged grad norm and the parameter update."""
    model, tok = build_tiny("nano", seed=0)
    args = config_cls(output_dir=str(out_dir) + f"/out{batch_size}x{accumulation}",
                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                      **{**COMMON, **config})
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    update = torch.cat([(p.detach() - before[n]).flatten() for n, p in trainer.model.named_parameters()
                        if n in before])
    return log["loss"], log["grad_norm"], update


def _assert_same_step(first, second):
    (loss_a, norm_a, update_a), (loss_b, norm_b, update_b) = first, second
    assert update_a.abs().max() > 0  # the step did train
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
    assert norm_b == pytest.approx(norm_a, rel=1e-5)
    torch.testing.assert_close(update_b, update_a, rtol=1e-4, atol=1e-4 * float(update_a.abs().max()))


def _assert_accumulation_is_one_batch(tmp_path, trainer_cls, config_cls, rows, **config):
    _assert_same_step(one_step(tmp_path, trainer_cls, config_cls, rows, 4, 1, **config),
                      one_step(tmp_path, trainer_cls, config_cls, rows, 2, 2, **config))


@pytest.mark.parametrize("config", [
    {},  # padding-free (the default)
    {"padding_free": False},
    {"loss_type": "dft"},
    {"packing": True, "max_length": 128},
], ids=["padding_free", "padded", "dft", "packing"])
def test_sft(tmp_path, config):
    _assert_accumulation_is_one_batch(tmp_path, SFTTrainer, SFTConfig, SFT_ROWS, **config)


def test_sft_loss_is_the_token_mean_over_the_whole_step(tmp_path):
    """The hand computation: the mean NLL of every completion token of the 3 rows, not a mean of per-batch means."""
    from posttrain.ops import token_logps

    model, tok = build_tiny("nano", seed=0)
    args = SFTConfig(output_dir=str(tmp_path / "h"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     padding_free=False, **{**COMMON, "learning_rate": 0.0})
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(SFT_ROWS), processing_class=tok)
    rows = list(trainer.train_dataset)
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "loss" in e)["loss"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            mask = torch.tensor([row["completion_mask"]]).bool()
            mask[0, 0] = False
            out = token_logps(model, ids, mask=mask)
            nll -= out.logps[mask].sum().item()
            count += int(mask.sum())
    assert logged == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("config", [
    {},
    {"rpo_alpha": 1.0},
    {"loss_type": ["ipo"]},
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
    {"padding_free": False, "rpo_alpha": 0.5},
], ids=["sigmoid", "rpo", "ipo", "sigmoid+sft", "padded-rpo"])
def test_dpo(tmp_path, config):
    _assert_accumulation_is_one_batch(tmp_path, DPOTrainer, DPOConfig, PAIRS,
                                      ref_logps_cache_dir=str(tmp_path / "cache"), **config)


@pytest.mark.parametrize("config", [{}, {"loss_type": "simpo", "cpo_alpha": 0.0}, {"loss_type": "simpo"}],
                         ids=["cpo", "simpo", "simpo+nll"])
def test_cpo(tmp_path, config):
    _assert_accumulation_is_one_batch(tmp_path, CPOTrainer, CPOConfig, PAIRS, **config)


def test_orpo(tmp_path):
    _assert_accumulation_is_one_batch(tmp_path, ORPOTrainer, ORPOConfig, PAIRS)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto(tmp_path, loss_type):
    # At the first step the policy is its reference, so KTO's per-micro-batch reference point z0 is 0 in both.
    _assert_accumulation_is_one_batch(tmp_path, KTOTrainer, KTOConfig, UNPAIRED, loss_type=loss_type,
                                      ref_logps_cache_dir=str(tmp_path / "cache"))


def test_bco(tmp_path):
    _assert_accumulation_is_one_batch(tmp_path, BCOTrainer, BCOConfig, UNPAIRED,
                                      ref_logps_cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("config", [{}, {"center_rewards_coefficient": 0.1}], ids=["bt", "centering"])
def test_reward(tmp_path, config):
    _assert_accumulation_is_one_batch(tmp_path, RewardTrainer, RewardConfig, PAIRS, **config)


@pytest.mark.parametrize("last_only", [False, True])
def test_prm(tmp_path, last_only):
    _assert_accumulation_is_one_batch(tmp_path, PRMTrainer, PRMConfig, STEPWISE, train_on_last_step_only=last_only)


# Under two processes (DDP over gloo), batch 1 x accumulation 2 on each must be one batch of the 4 rows: the item
# counts are summed over processes, and DDP's gradient average is undone by the per-process share.
METHODS = {
    "sft": (SFTTrainer, SFTConfig, SFT_ROWS + SFT_ROWS[:1], {}),
    "dpo": (DPOTrainer, DPOConfig, PAIRS + PAIRS[:1], {"rpo_alpha": 1.0}),
    "kto": (KTOTrainer, KTOConfig, UNPAIRED + UNPAIRED[1:2], {}),
    "reward": (RewardTrainer, RewardConfig, PAIRS + PAIRS[:1], {}),
    "prm": (PRMTrainer, PRMConfig, STEPWISE + STEPWISE[:1], {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_with_accumulation_are_one_batch(tmp_path, method):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    trainer_cls, config_cls, rows, config = METHODS[method]
    if config_cls in (DPOConfig, KTOConfig):
        config = {**config, "ref_logps_cache_dir": str(tmp_path / "cache")}
    single = one_step(tmp_path / "single", trainer_cls, config_cls, rows, 4, 1, **config)
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(root / "tests" / "scripts" / "ddp_offline.py"), str(tmp_path), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    _assert_same_step(single, (result["loss"], result["grad_norm"], result["update"]))
