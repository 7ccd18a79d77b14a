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
        total, terms = L.distillation_loss("distillm_v2", chosen, rejected, 0.1, 0.1, beta=beta)
        assert total.item() == pytest.approx(((2 - beta) * skl + beta * srkl).item(), abs=1e-6)
    # beta = 0 keeps only the teacher-response term, beta = 2 only the student-response term
    assert set(L.distillation_loss("distillm_v2", chosen, None, beta=0.0)[1]) == {"chosen_skew_forward_kl"}
    assert set(L.distillation_loss("distillm_v2", None, rejected, beta=2.0)[1]) == {"rejected_skew_reverse_kl"}
    with pytest.raises(ValueError, match="rejected responses"):
        L.distillation_loss("distillm_v2", chosen, None, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        L.distillation_loss("distillm_v2", chosen, rejected, beta=2.5)
    with pytest.raises(ValueError, match="unknown loss_type"):
        L.distillation_loss("dpo", chosen, rejected)


def test_sft_is_cross_entropy_on_labels(batch):
    chosen, _ = _sides(batch)
    total, terms = L.distillation_loss("sft", chosen, None)
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
    assert L.scheduled_beta(1.0, 0, 100, 0.0) == 1.0
    assert L.scheduled_beta(1.0, 0, 100, 0.5) == pytest.approx(0.02)
    assert L.scheduled_beta(1.0, 49, 100, 0.5) == pytest.approx(1.0)
    assert L.scheduled_beta(1.0, 99, 100, 0.5) == 1.0


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
