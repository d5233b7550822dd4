"""Preference losses (DPO variants, CPO/SimPO, ORPO, KTO, BCO) against written-out scalar math."""
import math

import pytest
import torch

from posttrain.losses import (
    RunningMean, bco_loss, chosen_nll, cpo_loss, dpo_loss, kto_kl_estimate, kto_loss, ld_pair_logps,
    length_desensitized_logps, log1mexp, orpo_loss, udm_density_ratio,
)

# Hand-made summed log-probs for 3 pairs: policy chosen/rejected, reference chosen/rejected, lengths.
PC = [-12.0, -20.5, -7.25]
PR = [-15.0, -18.0, -9.0]
RC = [-13.0, -19.0, -8.0]
RR = [-14.0, -19.5, -8.5]
LC = [4, 10, 3]
LR = [6, 8, 5]
BETA = 0.2


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x):
    return math.log(sig(x))


def expected(loss_type, eps=0.0, beta=BETA, delta=0.0, tau=0.05, pc=PC, pr=PR, rc=RC, rr=RR):
    out = []
    n = len(pc)
    # AOT sorts over the batch, computed with sorted() on python lists.
    aot_pair_d = [a - b for a, b in zip(sorted(pc[i] - rc[i] for i in range(n)), sorted(pr[i] - rr[i] for i in range(n)))]
    aot_d = [a - b for a, b in zip(sorted(pc[i] - pr[i] for i in range(n)), sorted(rc[i] - rr[i] for i in range(n)))]
    for i in range(n):
        c = pc[i] - rc[i]
        r = pr[i] - rr[i]
        h = c - r
        if loss_type == "sigmoid":
            v = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
        elif loss_type == "robust":
            v = (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            v = max(0.0, 1 - beta * h)
        elif loss_type == "exo_pair":
            e = eps or 1e-3
            p = sig(beta * h)
            v = p * (math.log(p) - math.log(1 - e)) + (1 - p) * (math.log(1 - p) - math.log(e))
        elif loss_type == "nca_pair":
            v = -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
        elif loss_type == "bco_pair":
            v = -logsig(beta * c - delta) - logsig(-(beta * r - delta))
        elif loss_type == "sppo_hard":
            v = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
        elif loss_type == "aot_pair":
            v = -(1 - eps) * logsig(beta * aot_pair_d[i]) - eps * logsig(-beta * aot_pair_d[i])
        elif loss_type == "aot":
            v = -(1 - eps) * logsig(beta * aot_d[i]) - eps * logsig(-beta * aot_d[i])
        elif loss_type == "apo_zero":
            v = (1 - sig(beta * c)) + sig(beta * r)
        elif loss_type == "apo_down":
            v = sig(beta * c) + (1 - sig(beta * (c - r)))
        elif loss_type == "discopop":
            x = beta * h
            m = sig(x / tau)
            v = (1 - m) * -logsig(x) + m * math.exp(-x)
        elif loss_type == "sft":
            v = -pc[i] / LC[i]
        elif loss_type == "ipo":
            hi = (pc[i] / LC[i] - rc[i] / LC[i]) - (pr[i] / LR[i] - rr[i] / LR[i])
            v = (hi - 1 / (2 * beta)) ** 2
        out.append(v)
    return out


def run_dpo(loss_type, **kw):
    return dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=kw.pop("beta", BETA), loss_type=loss_type,
                    chosen_lengths=t(LC), rejected_lengths=t(LR), **kw)


SIMPLE = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_pair",
          "apo_zero", "apo_down", "discopop", "sft"]


@pytest.mark.parametrize("loss_type", SIMPLE)
def test_dpo_variants_match_written_out(loss_type):
    losses, _ = run_dpo(loss_type)
    assert losses.tolist() == pytest.approx(expected(loss_type), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "aot_pair"])
def test_label_smoothing(loss_type):
    losses, _ = run_dpo(loss_type, label_smoothing=0.1)
    assert losses.tolist() == pytest.approx(expected(loss_type, eps=0.1), rel=1e-9)


def test_bco_pair_uses_delta():
    losses, _ = run_dpo("bco_pair", bco_delta=0.3)
    assert losses.tolist() == pytest.approx(expected("bco_pair", delta=0.3), rel=1e-9)


def test_discopop_tau():
    losses, _ = run_dpo("discopop", discopop_tau=0.5)
    assert losses.tolist() == pytest.approx(expected("discopop", tau=0.5), rel=1e-9)


def test_mpo_mix_is_weighted_sum_with_per_type_metrics():
    losses, metrics = run_dpo(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    want = [0.8 * a + 0.2 * b + c for a, b, c in zip(expected("sigmoid"), expected("bco_pair"), expected("sft"))]
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert metrics["loss/sft"].item() == pytest.approx(sum(expected("sft")) / 3)
    with pytest.raises(ValueError, match="loss_weights"):
        run_dpo(["sigmoid", "sft"], loss_weights=[1.0])


def test_reference_free_and_reward_metrics():
    losses, metrics = dpo_loss(t(PC), t(PR), beta=BETA, reference_free=True)
    zeros = [0.0] * 3
    assert losses.tolist() == pytest.approx(expected("sigmoid", rc=zeros, rr=zeros), rel=1e-9)
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * sum(PC) / 3)
    # With a reference: rewards are beta * log-ratio; accuracies compare per pair.
    _, m = run_dpo("sigmoid")
    rc = [BETA * (a - b) for a, b in zip(PC, RC)]
    rj = [BETA * (a - b) for a, b in zip(PR, RR)]
    assert m["rewards/chosen"].item() == pytest.approx(sum(rc) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rj) / 3)
    assert m["rewards/margins"].item() == pytest.approx(sum(a - b for a, b in zip(rc, rj)) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(sum(a > b for a, b in zip(rc, rj)) / 3)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(t(PC), t(PR))
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        run_dpo("nope")


def test_sigmoid_gradient_direction():
    pc = t(PC).requires_grad_()
    pr = t(PR).requires_grad_()
    losses, _ = dpo_loss(pc, pr, t(RC), t(RR), beta=BETA)
    losses.sum().backward()
    # d/dpc of -log sig(beta h) = -beta * (1 - sig(beta h))
    h = [(a - c) - (b - d) for a, b, c, d in zip(PC, PR, RC, RR)]
    assert pc.grad.tolist() == pytest.approx([-BETA * (1 - sig(BETA * x)) for x in h])
    assert pr.grad.tolist() == pytest.approx([BETA * (1 - sig(BETA * x)) for x in h])


def test_chosen_nll_is_token_mean():
    assert chosen_nll(t(PC), t(LC)).item() == pytest.approx(-sum(PC) / sum(LC))


def test_length_desensitized_logps():
    tok = t([[0.0, -1.0, -2.0, -3.0, -4.0, 0.0], [0.0, 0.0, -0.5, -1.5, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    # Row 0 has 4 completion tokens, row 1 has 2: public length 2 for the pair (row 0 chosen, row 1 rejected).
    alpha = 0.25
    got = length_desensitized_logps(tok, mask, torch.tensor([2, 2]), alpha)
    assert got.tolist() == pytest.approx([-1 - 2 + alpha * (-3 - 4), -0.5 - 1.5])
    c, r = ld_pair_logps(tok[:1], mask[:1], tok[1:], mask[1:], alpha)
    assert c.item() == pytest.approx(-3 + alpha * -7) and r.item() == pytest.approx(-2.0)
    full = length_desensitized_logps(tok, mask, torch.tensor([2, 2]), 1.0)
    assert full.tolist() == pytest.approx([-10.0, -2.0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_and_simpo(loss_type):
    beta, gamma, eps = 0.5, 0.7, 0.05
    losses, metrics = cpo_loss(t(PC), t(PR), beta=beta, loss_type=loss_type, label_smoothing=eps,
                               simpo_gamma=gamma, chosen_lengths=t(LC), rejected_lengths=t(LR))
    want, rewards = [], []
    for i in range(3):
        avg = loss_type in ("simpo", "ipo")
        sw = PC[i] / LC[i] if avg else PC[i]
        sl = PR[i] / LR[i] if avg else PR[i]
        h = sw - sl
        if loss_type == "sigmoid":
            v = -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
        elif loss_type == "simpo":
            v = -(1 - eps) * logsig(beta * h - gamma) - eps * logsig(gamma - beta * h)
        elif loss_type == "hinge":
            v = max(0.0, 1 - beta * h)
        else:
            v = (h - 1 / (2 * beta)) ** 2
        want.append(v)
        rewards.append(beta * sw)
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(rewards) / 3)
    with pytest.raises(ValueError, match="lengths"):
        cpo_loss(t(PC), t(PR), loss_type="simpo")


def test_orpo():
    beta = 0.25
    losses, metrics = orpo_loss(t(PC), t(PR), t(LC), t(LR), beta=beta)
    want, ratios = [], []
    for i in range(3):
        pw = math.exp(PC[i] / LC[i])
        pl = math.exp(PR[i] / LR[i])
        lo = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        ratios.append(logsig(lo))
        want.append(-beta * logsig(lo))
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert metrics["log_odds_ratio"].item() == pytest.approx(sum(ratios) / 3)


def test_log1mexp_stable():
    x = t([-1e-9, -1e-3, -0.5, -5.0, -50.0])
    got = log1mexp(x)
    assert torch.isfinite(got).all()
    for xi, gi in zip([-1e-3, -0.5, -5.0, -50.0], got[1:].tolist()):
        assert gi == pytest.approx(math.log(1 - math.exp(xi)), rel=1e-9)


LOGPS = [-5.0, -7.0, -3.0, -9.0]
REF = [-6.0, -6.5, -3.5, -8.0]
LABELS = [True, False, True, False]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto(loss_type):
    beta, wd, wu = 0.3, 1.5, 0.75
    kl_pol, kl_ref = t([-8.0, -6.0, -7.0, -5.0]), t([-8.5, -6.2, -7.1, -5.0])
    kl = kto_kl_estimate(kl_pol, kl_ref)
    z0 = max(0.0, sum(a - b for a, b in zip(kl_pol.tolist(), kl_ref.tolist())) / 4)
    assert kl.item() == pytest.approx(z0)
    losses, m = kto_loss(t(LOGPS), t(REF), torch.tensor(LABELS), kl=kl, beta=beta, desirable_weight=wd,
                         undesirable_weight=wu, loss_type=loss_type)
    want = []
    for lp, rf, lab in zip(LOGPS, REF, LABELS):
        r = lp - rf
        if loss_type == "kto":
            v = wd * (1 - sig(beta * (r - z0))) if lab else wu * (1 - sig(beta * (z0 - r)))
        else:
            v = wd * (1 - sig(beta * r)) if lab else wu * sig(beta * r)
        want.append(v)
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx(beta * ((-5 + 6) + (-3 + 3.5)) / 2)
    assert m["count/rejected"].item() == 2


def test_kto_kl_is_clamped_and_detached():
    a = t([-5.0, -5.0]).requires_grad_()
    kl = kto_kl_estimate(a, t([-4.0, -4.0]))
    assert kl.item() == 0.0 and not kl.requires_grad


def test_kto_all_one_label_has_no_nan_mean():
    _, m = kto_loss(t([-1.0]), t([-2.0]), torch.tensor([True]))
    assert "rewards/rejected" not in m and m["count/rejected"].item() == 0


def test_bco_with_running_delta_and_udm():
    beta = 0.4
    run = RunningMean()
    run.update(torch.tensor(0.2))
    delta = run.update(torch.tensor([0.4, 0.6]))  # mean of all values seen
    assert delta == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    p_desirable = t([0.9, 0.3, 0.5, 0.999])
    w = udm_density_ratio(p_desirable, min_ratio=0.5, max_ratio=10.0)
    assert w.tolist() == pytest.approx([9.0, 0.5, 1.0, 10.0], rel=1e-6)
    losses, m = bco_loss(t(LOGPS), t(REF), torch.tensor(LABELS), beta=beta, delta=delta, udm_weights=w)
    want = []
    for lp, rf, lab, wi in zip(LOGPS, REF, LABELS, w.tolist()):
        r = beta * (lp - rf)
        want.append(-logsig(r - delta) if lab else -wi * logsig(-(r - delta)))
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert m["delta"].item() == pytest.approx(delta)
    state = run.state_dict()
    other = RunningMean()
    other.load_state_dict(state)
    assert other.mean == pytest.approx(run.mean) and other.count == 3


def test_bco_class_weights_scale_each_class():
    beta, delta, wd, wu = 0.3, 0.1, 2.0, 0.5
    losses, _ = bco_loss(t(LOGPS), t(REF), torch.tensor(LABELS), beta=beta, delta=delta,
                         desirable_weight=wd, undesirable_weight=wu)
    want = [-wd * logsig(beta * (lp - rf) - delta) if lab else -wu * logsig(-(beta * (lp - rf) - delta))
            for lp, rf, lab in zip(LOGPS, REF, LABELS)]
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
