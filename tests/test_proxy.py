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
    # every text shares the direction (1, 1); what is left separates them
    a = np.array([[1.0, 1.2]])
    b = np.array([[1.0, 0.8]])
    centre = np.array([1.0, 1.0]) / math.sqrt(2)
    raw = rowwise_similarity(a, b)[0]
    ua, ub = a[0] / np.linalg.norm(a[0]), b[0] / np.linalg.norm(b[0])
    ca, cb = ua - centre, ub - centre
    expected = float(ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb))
    assert raw == pytest.approx((1 + 0.96) / math.sqrt(2.44 * 1.64))
    assert raw > 0.95
    assert rowwise_similarity(a, b, centre)[0] == pytest.approx(expected)
    assert expected < -0.99  # the two lie on opposite sides of the shared direction


def test_zero_vector_has_cosine_zero():
    assert rowwise_similarity(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0
    # a text equal to the centre has nothing left
    assert rowwise_similarity(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([1.0, 0.0]))[0] == 0.0


def test_centre_is_the_mean_of_unit_vectors():
    bg = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0], [5.0, 0.0]])
    assert centre_of(bg) == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match="at least 4 background"):
        centre_of(bg[:3])
    with pytest.raises(ValueError, match="2-D"):
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
    # a perfect proxy beats every other reference
    assert calibrate(np.eye(5)).rank_auc == 1.0
    # an inverted one never does
    assert calibrate(1 - np.eye(5)).rank_auc == 0.0
    with pytest.raises(ValueError, match="square matrix of at least 2"):
        calibrate(np.ones((1, 1)))
    with pytest.raises(ValueError, match="square"):
        calibrate(np.ones((2, 3)))


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
    centre = centre_of(np.vstack([refs, questions]))
    expected_echo = float(np.mean(rowwise_similarity(questions, refs, centre)))
    assert out["centred_echo_question"] == pytest.approx(expected_echo)
    assert out["centred"] == pytest.approx(1.0)
    assert set(out) == {f"{p}{s}" for p in ("raw", "centred") for s in ("", "_echo_question", "_other_reference", "_auc")}
    with pytest.raises(ValueError, match="at least 2 rows"):
        descriptive_baselines(answers[:1], refs[:1], questions[:1])
    with pytest.raises(ValueError, match="one shape"):
        descriptive_baselines(answers[:2], refs, questions)
