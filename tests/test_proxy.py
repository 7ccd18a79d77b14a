"""Similarity proxies and their calibration, against hand-computed values and limit cases."""
import math

import numpy as np
import pytest

from fsku.evaluate.proxy import calibrate, centre_of, rowwise_similarity, similarity_matrix


def test_raw_similarity_normalises_inputs():
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[4.0, 3.0], [0.0, 2.0]])
    # (3*4 + 4*3) / (5 * 5) = 0.96; (1, 0) . (0, 1) = 0
    assert rowwise_similarity(a, b) == pytest.approx([0.96, 0.0])
    assert similarity_matrix(a, b) == pytest.approx(np.array([[0.96, 0.8], [0.8, 0.0]]))


def test_centred_similarity_by_hand():
    # every text shares the direction (0, 1); what is left separates them
    a, b, centre = np.array([[1.0, 1.0]]), np.array([[-1.0, 1.0]]), np.array([0.0, 1.0])
    assert rowwise_similarity(a, b)[0] == pytest.approx(0.0)
    # (1, 1)/sqrt2 - (0, 1) = (0.7071, -0.2929); (-1, 1)/sqrt2 - (0, 1) = (-0.7071, -0.2929):
    # cosine = (-0.5 + 0.0858) / 0.5858 = -1/sqrt2
    assert rowwise_similarity(a, b, centre)[0] == pytest.approx(-1 / math.sqrt(2), abs=1e-4)
    assert similarity_matrix(a, b, centre)[0, 0] == pytest.approx(-1 / math.sqrt(2), abs=1e-4)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="one width"):
        similarity_matrix(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="centre must be one embedding of width 3"):
        rowwise_similarity(np.ones((2, 3)), np.ones((2, 3)), np.ones(2))


def test_zero_vector_has_cosine_zero():
    assert rowwise_similarity(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0
    # a text equal to the centre has nothing left
    assert rowwise_similarity(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([1.0, 0.0]))[0] == 0.0


def test_centre_is_the_mean_of_unit_vectors():
    bg = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [5.0, 0.0]])
    assert centre_of(bg) == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match="at least 4 background"):
        centre_of(bg[:3])
    with pytest.raises(ValueError, match=r"2-D array\); got shape \(8,\)"):
        centre_of(np.ones(8))


def test_rowwise_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        rowwise_similarity(np.ones((2, 3)), np.ones((3, 3)))


def test_calibration_by_hand():
    sim = np.array([[0.9, 0.5, 0.7],
                    [0.6, 0.8, 0.8],
                    [0.1, 0.2, 0.3]])
    c = calibrate(sim)
    assert c.n == 3
    assert c.own == pytest.approx((0.9 + 0.8 + 0.3) / 3)
    others = [0.5, 0.7, 0.6, 0.8, 0.1, 0.2]
    assert c.other == pytest.approx(np.mean(others))
    assert c.gap == pytest.approx(c.own - c.other)
    assert c.gap_sd == pytest.approx(c.gap / np.std(others))
    # row 0 beats both; row 1 beats 0.6 and ties 0.8 -> 0.75; row 2 beats both
    assert c.rank_auc == pytest.approx((1 + 0.75 + 1) / 3)


def test_calibration_limits():
    # a proxy that says the same for everything: no gap, chance AUC, no spread
    flat = calibrate(np.full((4, 4), 0.88))
    assert (flat.gap, flat.gap_sd, flat.rank_auc) == (pytest.approx(0.0), 0.0, pytest.approx(0.5))
    # a perfect proxy beats every other reference; its others do not vary: infinitely many spreads, not 0
    perfect = calibrate(np.eye(5))
    assert perfect.rank_auc == 1.0 and perfect.gap == pytest.approx(1.0) and perfect.gap_sd == math.inf
    assert calibrate(1 - np.eye(5)).gap_sd == -math.inf
    # an inverted one never does
    assert calibrate(1 - np.eye(5)).rank_auc == 0.0
    with pytest.raises(ValueError, match="square matrix of at least 2"):
        calibrate(np.ones((1, 1)))
    with pytest.raises(ValueError, match="square"):
        calibrate(np.ones((2, 3)))
    with pytest.raises(ValueError, match="square"):
        calibrate(np.float64(0.5))


def test_descriptive_baselines_by_hand():
    from fsku.evaluate.proxy import descriptive_baselines

    refs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    answers = refs.copy()  # perfect answers
    questions = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    out = descriptive_baselines(answers, refs, questions)
    assert out["raw"] == pytest.approx(1.0)
    assert out["raw_auc"] == 1.0
    assert out["raw_echo_question"] == pytest.approx(1 / math.sqrt(2))
    assert out["raw_other_reference"] == pytest.approx(0.0)  # orthogonal references
    assert set(out) == {"raw", "raw_echo_question", "raw_other_reference", "raw_auc"}  # no centre, no centred
    # centre (0.5, 0, 0): e1 -> (1, 0, 0); e2 -> (-0.5, 1, 0)/sqrt1.25; e3 -> (-0.5, 0, 1)/sqrt1.25; the next row's
    # reference: cos(e2', e1') = cos(e1', e3') = -0.5/sqrt1.25, cos(e3', e2') = 0.25/1.25
    out = descriptive_baselines(answers, refs, questions, centre=np.array([0.5, 0.0, 0.0]))
    assert out["centred_other_reference"] == pytest.approx((-2 * 0.5 / math.sqrt(1.25) + 0.25 / 1.25) / 3)
    assert out["centred"] == pytest.approx(1.0) and out["centred_auc"] == 1.0
    # an unanswered row scores 0 for the answers; baselines keep every row, the AUC the answered ones
    part = descriptive_baselines(answers, refs, questions, answered=[True, True, False])
    assert part["raw"] == pytest.approx(2 / 3) and part["raw_auc"] == 1.0
    assert part["raw_echo_question"] == out["raw_echo_question"]
    assert "raw_auc" not in descriptive_baselines(answers, refs, questions, answered=[True, False, False])
    with pytest.raises(ValueError, match="one flag per row"):
        descriptive_baselines(answers, refs, questions, answered=[True])
    with pytest.raises(ValueError, match="at least 2 rows"):
        descriptive_baselines(answers[:1], refs[:1], questions[:1])
    with pytest.raises(ValueError, match="one shape"):
        descriptive_baselines(answers[:2], refs, questions)
