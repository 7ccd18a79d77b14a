"""Distillation losses against an independent naive implementation (explicit loops over the vocabulary)."""
import math

import pytest
import torch

from fsku.distill import losses as L


def softmax_list(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def kl_list(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def naive_token(name, p, q, alpha=0.1, w=0.5):
    if name == "forward_kl":
        return kl_list(p, q)
    if name == "reverse_kl":
        return kl_list(q, p)
    if name == "skew_forward_kl":
        return kl_list(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    if name == "skew_reverse_kl":
        return kl_list(q, [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q)])
    if name == "generalized_jsd":
        m = [w * pi + (1 - w) * qi for pi, qi in zip(p, q)]
        return w * kl_list(p, m) + (1 - w) * kl_list(q, m)
    if name == "cross_entropy":
        raise AssertionError


def naive_masked(name, s_logits, t_logits, mask, alpha=0.1, w=0.5):
    """Per-sequence mean over masked tokens, then mean over sequences with any token."""
    per_seq = []
    for b in range(s_logits.shape[0]):
        vals = []
        for t in range(s_logits.shape[1]):
            if mask[b, t]:
                a = alpha[b] if isinstance(alpha, list) else alpha
                vals.append(naive_token(name, softmax_list(t_logits[b, t].tolist()),
                                        softmax_list(s_logits[b, t].tolist()), a, w))
        if vals:
            per_seq.append(sum(vals) / len(vals))
    return sum(per_seq) / len(per_seq)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    return s, t, mask


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd"])
def test_token_divergences_match_naive_loops(batch, name):
    s, t, mask = batch
    log_q, log_p = L.shared_log_softmax(s, t)
    fn = getattr(L, name)
    if name.startswith("skew"):
        values = fn(log_p, log_q, 0.1)
    elif name == "generalized_jsd":
        values = fn(log_p, log_q, 0.3)
    else:
        values = fn(log_p, log_q)
    got = L.masked_mean(values, mask).item()
    want = naive_masked(name, s, t, mask, alpha=0.1, w=0.3)
    assert got == pytest.approx(want, abs=1e-5)


def test_per_sequence_alpha_matches_naive(batch):
    s, t, mask = batch
    log_q, log_p = L.shared_log_softmax(s, t)
    alpha = [0.05, 0.1, 0.3]
    for name in ("skew_forward_kl", "skew_reverse_kl"):
        got = L.masked_mean(getattr(L, name)(log_p, log_q, torch.tensor(alpha)), mask).item()
        assert got == pytest.approx(naive_masked(name, s, t, mask, alpha=alpha), abs=1e-5)


def test_limit_cases(batch):
    s, t, mask = batch
    log_q, log_p = L.shared_log_softmax(s, t)
    # alpha -> 0: skew KLs become the plain ones
    assert torch.allclose(L.skew_forward_kl(log_p, log_q, 1e-9), L.forward_kl(log_p, log_q), atol=1e-6)
    assert torch.allclose(L.skew_reverse_kl(log_p, log_q, 1e-9), L.reverse_kl(log_p, log_q), atol=1e-6)
    # p = q: every divergence is 0
    for fn in (L.forward_kl, L.reverse_kl):
        assert torch.allclose(fn(log_p, log_p), torch.zeros(3, 5, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(L.skew_forward_kl(log_p, log_p, 0.1), torch.zeros(3, 5), atol=1e-6)
    assert torch.allclose(L.skew_reverse_kl(log_p, log_p, 0.1), torch.zeros(3, 5), atol=1e-6)
    assert torch.allclose(L.generalized_jsd(log_p, log_p, 0.5), torch.zeros(3, 5), atol=1e-6)
    # divergences are non-negative
    assert (L.skew_forward_kl(log_p, log_q, 0.1) >= -1e-7).all()
    assert (L.generalized_jsd(log_p, log_q, 0.5) >= -1e-7).all()
    with pytest.raises(ValueError, match="alpha"):
        L.skew_forward_kl(log_p, log_q, 1.0)


def _sides(batch):
    s, t, mask = batch
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    log_q, log_p = L.shared_log_softmax(s, t)
    return L.Side(log_q, log_p, labels, mask), L.Side(log_q.flip(0), log_p.flip(0), labels, mask.flip(0))


def test_beta_weights_and_one_sided_limits(batch):
    chosen, rejected = _sides(batch)
    skl = L.masked_mean(L.skew_forward_kl(chosen.log_p, chosen.log_q, 0.1), chosen.mask)
    srkl = L.masked_mean(L.skew_reverse_kl(rejected.log_p, rejected.log_q, 0.1), rejected.mask)
    for beta in (0.0, 0.5, 1.0, 2.0):
        total, terms = L.distillation_loss("distillm_v2", chosen, rejected, 0.1, 0.1, beta=beta, jsd_weight=0.5)
        assert total.item() == pytest.approx(((2 - beta) * skl + beta * srkl).item(), abs=1e-6)
    # beta = 0 keeps only the teacher-response term, beta = 2 only the student-response term
    assert set(L.distillation_loss("distillm_v2", chosen, None, 0.1, 0.1, beta=0.0, jsd_weight=0.5)[1]) \
        == {"chosen_skew_forward_kl"}
    assert set(L.distillation_loss("distillm_v2", None, rejected, 0.1, 0.1, beta=2.0, jsd_weight=0.5)[1]) \
        == {"rejected_skew_reverse_kl"}
    with pytest.raises(ValueError, match="rejected responses"):
        L.distillation_loss("distillm_v2", chosen, None, 0.1, 0.1, beta=1.0, jsd_weight=0.5)
    with pytest.raises(ValueError, match="beta"):
        L.distillation_loss("distillm_v2", chosen, rejected, 0.1, 0.1, beta=2.5, jsd_weight=0.5)
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.distillation_loss("dpo", chosen, rejected, 0.1, 0.1, beta=1.0, jsd_weight=0.5)


def test_sft_is_cross_entropy_on_labels(batch):
    chosen, _ = _sides(batch)
    total, terms = L.distillation_loss("sft", chosen, None, 0.1, 0.1, beta=1.0, jsd_weight=0.5)
    want = []
    for b in range(3):
        vals = [-chosen.log_q[b, t, chosen.labels[b, t]].item() for t in range(5) if chosen.mask[b, t]]
        want.append(sum(vals) / len(vals))
    assert total.item() == pytest.approx(sum(want) / 3, abs=1e-5)
    assert "chosen_cross_entropy" in terms


def test_gradients_reach_only_the_student_and_not_the_mixture_copy():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    log_q = torch.log_softmax(s, -1)
    log_p = torch.log_softmax(t, -1).detach()  # the trainer never lets gradients into the teacher
    L.masked_mean(L.skew_reverse_kl(log_p, log_q, 0.1), mask).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    # analytic gradient of SRKL with a stop-gradient mixture: d/dlog q of sum q (log q - log m), m fixed
    s2 = s.detach().clone().requires_grad_(True)
    lq = torch.log_softmax(s2, -1)
    log_m = torch.logaddexp(math.log(0.9) + log_p, math.log(0.1) + lq.detach())
    L.masked_mean((lq.exp() * (lq - log_m)).sum(-1), mask).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)
    # ...which differs from the gradient without the stop-gradient
    s3 = s.detach().clone().requires_grad_(True)
    lq3 = torch.log_softmax(s3, -1)
    log_m3 = torch.logaddexp(math.log(0.9) + log_p, math.log(0.1) + lq3)
    L.masked_mean((lq3.exp() * (lq3 - log_m3)).sum(-1), mask).backward()
    assert not torch.allclose(s.grad, s3.grad, atol=1e-4)


def test_padded_vocab_is_cut_to_the_tokenizer_size():
    s = torch.randn(1, 2, 12)
    t = torch.randn(1, 2, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        L.shared_log_softmax(s, t)
    log_q, log_p = L.shared_log_softmax(s, t, vocab_size=9)
    assert log_q.shape[-1] == log_p.shape[-1] == 9
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="exceeds"):
        L.shared_log_softmax(s, t, vocab_size=11)


def test_adaptive_alpha_and_beta_schedule():
    gap = torch.tensor([0.5, 0.05, -0.1])
    a = L.adaptive_alpha(gap, reference_gap=0.5, base_alpha=0.1)
    # gap as large as the reference: 1 - 0.9*0.5/0.5 = 0.1 (the cap); a closed gap hits the floor;
    # a negative gap (student already likelier) keeps the cap
    assert a.tolist() == pytest.approx([0.1, 0.01, 0.1], abs=1e-4)


def test_adaptive_alpha_keeps_the_base_alpha_when_the_reference_gap_is_not_positive():
    gap = torch.tensor([0.5, 0.05, -0.1, -0.6])
    for ref in (0.0, -0.2, float("nan")):
        assert L.adaptive_alpha(gap, reference_gap=ref, base_alpha=0.1).tolist() == pytest.approx([0.1] * 4)
    # a tiny positive reference still adapts: 1 - 0.9 * 1e-3 / 0.5 = 0.9982 -> capped at 0.1; gap 1e-4 -> floor
    assert L.adaptive_alpha(torch.tensor([0.5, 1e-4]), 1e-3, 0.1).tolist() == pytest.approx([0.1, 0.01], abs=1e-4)


def test_gradual_beta_is_the_authors_curriculum():
    # the authors' trainer: beta = 1.0 + 0.5 * min(1, 2 * global_step / max_steps)
    for total in (1, 7, 100):
        for step in range(total):
            got = L.scheduled_beta(1.0, step, total, gradual=True, start=1.0, end=1.5, ramp_ratio=0.5)
            assert got == pytest.approx(1.0 + 0.5 * min(1.0, 2 * step / total)), (total, step)
    kw = dict(gradual=True, start=0.5, end=1.7, ramp_ratio=0.25)
    assert [L.scheduled_beta(1.0, s, 8, **kw) for s in (0, 1, 2, 5)] == pytest.approx([0.5, 1.1, 1.7, 1.7])
    assert L.scheduled_beta(1.0, 3, 0, **kw) == 1.7  # no step count known: the end value
    assert L.scheduled_beta(0.7, 3, 100, gradual=False, start=1.0, end=1.5, ramp_ratio=0.5) == 0.7
    # it never starts from 0 (the old ramp did: 0.02 at the first step)
    assert L.scheduled_beta(1.0, 0, 100, gradual=True, start=1.0, end=1.5, ramp_ratio=0.5) == 1.0


def test_gradual_beta_settings_are_checked():
    from fsku.config import LossSettings

    assert LossSettings().gradual_beta is False and (LossSettings().beta_start, LossSettings().beta_end) == (1.0, 1.5)
    for bad in ({"beta_start": -0.1}, {"beta_end": 2.5}, {"beta_ramp_ratio": 0.0}, {"beta_ramp_ratio": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossSettings(**bad)


def test_masked_mean_ignores_empty_sequences():
    v = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert L.masked_mean(v, torch.tensor([[1, 1], [0, 0]])).item() == 2.0
    assert L.masked_mean(v, torch.zeros(2, 2)).item() == 0.0


def test_sequence_prob_gap():
    log_p = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    log_q = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    labels = torch.tensor([[0, 0]])
    gap = L.sequence_prob_gap(log_p, log_q, labels, torch.ones(1, 2))
    want = math.exp((math.log(0.5) + math.log(0.9)) / 2) - math.exp((math.log(0.25) + math.log(0.5)) / 2)
    assert gap.item() == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- every loss type against naive loops
#
# What each loss type means, written down here from the papers' definitions (DistiLLM-2; forward KD;
# on-policy reverse KL; GKD's generalised JSD) and NOT read from LOSS_TYPES: the divergence on teacher
# responses ("chosen") and on student responses ("rejected"). Two-sided types weigh the terms
# (2 - beta, beta); one-sided types weigh their one term by 1.
EXPECTED_WIRING = {
    "distillm_v2": ("skew_forward_kl", "skew_reverse_kl"),
    "sft": ("cross_entropy", None),
    "kd": ("forward_kl", None),
    "rkl": (None, "reverse_kl"),
    "gkd": ("generalized_jsd", "generalized_jsd"),
}


def naive_weights(loss_type, beta):
    chosen, rejected = EXPECTED_WIRING[loss_type]
    if chosen and rejected:
        return 2.0 - beta, beta
    return (1.0, 0.0) if chosen else (0.0, 1.0)


def naive_side(q_rows, p_rows, labels, mask):
    """One side as plain Python: q_rows[b][t] / p_rows[b][t] are probability lists (None off the mask)."""
    return {"q": q_rows, "p": p_rows, "labels": labels, "mask": mask}


def naive_side_from_logits(s_logits, t_logits, labels, mask):
    """Student / teacher logits [batch, time, vocab] -> plain-list probabilities at the masked positions."""
    mask = [[bool(x) for x in row] for row in mask.tolist()]
    q = [[softmax_list(s_logits[b, t].tolist()) if mask[b][t] else None for t in range(len(mask[b]))]
         for b in range(len(mask))]
    p = None if t_logits is None else [[softmax_list(t_logits[b, t].tolist()) if mask[b][t] else None
                                        for t in range(len(mask[b]))] for b in range(len(mask))]
    return naive_side(q, p, labels.tolist(), mask)


def naive_side_loss(name, side, alpha, w):
    """Mean of the token divergence over each sequence's masked positions, then over sequences that
    have any; `alpha` is one float or one float per sequence."""
    per_seq = []
    for b, row in enumerate(side["mask"]):
        a = alpha[b] if isinstance(alpha, (list, tuple)) else alpha
        vals = []
        for t, on in enumerate(row):
            if not on:
                continue
            q = side["q"][b][t]
            if name == "cross_entropy":
                vals.append(-math.log(q[side["labels"][b][t]]))
            else:
                vals.append(naive_token(name, side["p"][b][t], q, a, w))
        if vals:
            per_seq.append(sum(vals) / len(vals))
    return sum(per_seq) / len(per_seq)


def naive_loss(loss_type, chosen, rejected, alpha_chosen, alpha_rejected, beta, w):
    """(total, {"<side>_<divergence>": term}) of one batch, from the formulas alone."""
    total, terms = 0.0, {}
    for key, name, weight, side, alpha in zip(("chosen", "rejected"), EXPECTED_WIRING[loss_type],
                                              naive_weights(loss_type, beta), (chosen, rejected),
                                              (alpha_chosen, alpha_rejected)):
        if name is None or weight == 0.0:
            continue
        value = naive_side_loss(name, side, alpha, w)
        terms[f"{key}_{name}"] = value
        total += weight * value
    return total, terms


def naive_sequence_gap(side, reverse=False):
    """exp(mean log p(y)) - exp(mean log q(y)) per sequence (reverse: q first), from the label probabilities."""
    out = []
    for b, row in enumerate(side["mask"]):
        lp = [math.log(side["p"][b][t][side["labels"][b][t]]) for t, on in enumerate(row) if on]
        lq = [math.log(side["q"][b][t][side["labels"][b][t]]) for t, on in enumerate(row) if on]
        gp, gq = math.exp(sum(lp) / len(lp)), math.exp(sum(lq) / len(lq))
        out.append(gq - gp if reverse else gp - gq)
    return out


def _two_sides():
    """Independent random chosen and rejected sides (different logits, labels and masks)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for mask in ([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]):
        s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
        t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
        labels = torch.randint(0, 11, (3, 5), generator=g)
        mask = torch.tensor(mask, dtype=torch.bool)
        log_q, log_p = L.shared_log_softmax(s, t)
        out.append((L.Side(log_q, log_p, labels, mask), naive_side_from_logits(s, t, labels, mask)))
    return out


@pytest.mark.parametrize("loss_type", sorted(EXPECTED_WIRING))
def test_every_loss_type_matches_naive_loops(loss_type):
    """Non-default beta and JSD weight, a different alpha per side (per sequence on the chosen side):
    a loss type wired to the wrong divergence, a side, weight or alpha ignored, all change the value."""
    (chosen, naive_c), (rejected, naive_r) = _two_sides()
    alpha_c, alpha_r, beta, w = [0.15, 0.25, 0.4], 0.35, 0.6, 0.3
    total, terms = L.distillation_loss(loss_type, chosen, rejected, torch.tensor(alpha_c), alpha_r, beta=beta,
                                       jsd_weight=w)
    want_total, want_terms = naive_loss(loss_type, naive_c, naive_r, alpha_c, alpha_r, beta, w)
    assert total.item() == pytest.approx(want_total, rel=1e-6, abs=1e-6)
    assert set(terms) == set(want_terms)
    for key, value in want_terms.items():
        assert terms[key].item() == pytest.approx(value, rel=1e-6, abs=1e-6), key
    # the default JSD weight (0.5) gives a different gkd value: the weight is really passed through
    if loss_type == "gkd":
        default, _ = naive_loss(loss_type, naive_c, naive_r, alpha_c, alpha_r, beta, 0.5)
        assert abs(default - want_total) > 1e-3


def test_naive_loss_types_differ_on_this_batch():
    """The batch above tells the divergences apart (else the test before could not catch a mis-wiring)."""
    (_, naive_c), (_, naive_r) = _two_sides()
    names = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd", "cross_entropy")
    values = {(name, key): naive_side_loss(name, side, 0.35, 0.3)
              for name in names for key, side in (("chosen", naive_c), ("rejected", naive_r))}
    for key in ("chosen", "rejected"):  # on one side, every divergence has its own value
        ordered = sorted(values[(name, key)] for name in names)
        assert all(b - a > 1e-3 for a, b in zip(ordered, ordered[1:])), values
    for name in names:  # and a term computed on the other side would show
        assert abs(values[(name, "chosen")] - values[(name, "rejected")]) > 1e-3, name
