"""Peak memory of a GKD training step (loss + backward) on a 32k vocabulary with a 2x-wider teacher: the
trainer's chunked path against the naive one that holds both models' full logits (TRL's GKD)."""

from __future__ import annotations

import pytest

from _memory import peak_kib

SETUP = """
from posttrain.losses.distill import generalized_jsd_loss
from posttrain.models import build_tiny
from posttrain.online.rollout_batch import RolloutBatch
from posttrain.tasks import ArithmeticTask
from posttrain.trainers.gkd import GKDConfig, GKDTrainer

student, tok = build_tiny("hidden=64,layers=1,heads=1,vocab=32768,tie=0")
teacher, _ = build_tiny("hidden=128,layers=1,heads=2,vocab=32768,tie=0", seed=1)
args = GKDConfig(output_dir="/tmp/posttrain-test-distill-mem", report_to="none", save_strategy="no",
                 disable_tqdm=True, per_device_train_batch_size=8, lmbda=0.0, beta=0.5)
trainer = GKDTrainer(student, teacher, args, train_dataset=ArithmeticTask(digits=2).prompt_completion(8),
                     processing_class=tok)
trainer.model.train()
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 2000, (32,), generator=g).tolist() for _ in range(8)]
completions = [torch.randint(3, 2000, (128,), generator=g).tolist() for _ in range(8)]
batch = RolloutBatch(prompts, completions, torch.ones(8, 128))

def chunked():
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return float(loss)

def naive():
    trainer.model.zero_grad(set_to_none=True)
    ids = torch.tensor([p + c for p, c in zip(prompts, completions)])
    labels = ids.clone()
    labels[:, :32] = -100
    zs = student(input_ids=ids).logits
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits
    loss = generalized_jsd_loss(zs[:, :-1], zt[:, :-1], labels[:, 1:], beta=0.5, temperature=args.temperature)
    loss.backward()
    return float(loss)
"""


@pytest.mark.slow  # a fresh interpreter and two 32k-vocabulary steps: ~2 min on the shared 2-core VM
def test_gkd_step_peak_memory_is_well_below_the_full_logits_path():
    res = peak_kib(SETUP, {"chunked": "chunked()", "naive": "naive()"})
    chunked, naive = res["chunked"], res["naive"]
    print(f"GKD step peak RSS, 1024 completion tokens, V=32768: chunked {chunked['peak_kib'] / 1024:.0f} MiB, "
          f"full logits {naive['peak_kib'] / 1024:.0f} MiB")
    assert chunked["value"] == pytest.approx(naive["value"], rel=1e-3)
    assert naive["peak_kib"] > 4 * 128 * 1024  # several [1024, 32768] float32 tensors (128 MiB each)
    assert chunked["peak_kib"] < naive["peak_kib"] / 4, (chunked, naive)
