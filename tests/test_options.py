"""Multiple-choice math: option orders, debiasing, votes and answer parsing (hand-computed values)."""
import math

import numpy as np
import pytest

from fsku.infer import options as opt


def test_cyclic_orders():
    assert opt.cyclic_orders(4) == [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]
    assert opt.cyclic_orders(4, 2) == [[0, 1, 2, 3], [2, 3, 0, 1]]
    assert opt.cyclic_orders(5, 1) == [[0, 1, 2, 3, 4]]
    assert opt.cyclic_orders(3, 9) == opt.cyclic_orders(3)
    with pytest.raises(ValueError, match="need at least one option"):
        opt.cyclic_orders(0)


def test_option_orders_with_reversed_rotations():
    assert opt.option_orders(4) == opt.cyclic_orders(4)
    orders = opt.option_orders(4, reverse=True)
    assert orders[4:] == [[0, 3, 2, 1], [1, 0, 3, 2], [2, 1, 0, 3], [3, 2, 1, 0]]
    # every option at every position twice, and every option preceded by each neighbour equally often
    for pos in range(4):
        assert sorted(o[pos] for o in orders) == [0, 0, 1, 1, 2, 2, 3, 3]
    follows = {(o[j], o[j + 1]) for o in orders for j in range(3)}
    assert (1, 0) in follows and (0, 1) in follows
    assert opt.option_orders(5, 2, reverse=True) == opt.cyclic_orders(5, 2) + [[0, 4, 3, 2, 1], [2, 1, 0, 4, 3]]


def test_rotation_average_cancels_a_position_bias():
    # option B (index 1) is better, but the model prefers whatever is shown first
    display = np.log([[0.6, 0.4],    # order [A, B]
                      [0.9, 0.1]])   # order [B, A]
    scores = opt.aggregate_orders(display, [[0, 1], [1, 0]])
    assert scores[0] == pytest.approx((math.log(0.6) + math.log(0.1)) / 2)
    assert scores[1] == pytest.approx((math.log(0.4) + math.log(0.9)) / 2)
    assert int(np.argmax(display[0])) == 0 and int(np.argmax(scores)) == 1


def test_aggregate_normalises_each_order_over_the_labels():
    # unnormalised next-token log-probs (other vocabulary mass) give the same result as normalised ones
    display = np.log([[0.3, 0.1], [0.05, 0.15]])
    a = opt.aggregate_orders(display, [[0, 1], [1, 0]])
    b = opt.aggregate_orders(np.log([[0.75, 0.25], [0.25, 0.75]]), [[0, 1], [1, 0]])
    assert np.allclose(a, b)


def test_calibrate_divides_by_content_free_probabilities():
    out = np.exp(opt.calibrate(np.log([0.7, 0.3]), np.log([0.8, 0.2])))
    assert out == pytest.approx([0.875 / 2.375, 1.5 / 2.375])
    # a content-free distribution that is uniform changes nothing
    assert np.exp(opt.calibrate(np.log([0.7, 0.3]), np.log([0.5, 0.5]))) == pytest.approx([0.7, 0.3])


def test_choice_confidence():
    best, p = opt.choice_confidence(np.log([0.2, 0.8]))
    assert best == 1 and p == pytest.approx(0.8)


@pytest.mark.parametrize("text,n,expected", [
    ("정답: 3", 4, 3),
    ("따라서 정답은 2번입니다.", 4, 2),
    ("1번과 2번을 비교하면 2번이 더 넓다.\n정답: 4", 4, 4),
    ("3", 5, 3),
    ("(2)", 4, 2),
    ("정답: ③", 4, 3),
    ("Answer: 1", 4, 1),
    ("정답: 7", 4, None),
    ("", 4, None),
    ("잘 모르겠습니다", 4, None),
    ("정답: 12", 12, 12),  # 10+ options: the whole number, not its first digit
    ("정답: 12", 5, None),
    ("따라서 11번이 옳다", 12, 11),
    ("정답: ⑫", 12, 12),
    ("10", 10, 10),
    ("제113번 문항의 정답: 3", 4, 3),
])
def test_parse_choice(text, n, expected):
    assert opt.parse_choice(text, n) == expected


def test_majority_vote_with_ties_and_no_votes():
    scores = np.log([0.1, 0.2, 0.3, 0.4])
    assert opt.majority_vote([2, 2, 3, None], scores) == (2, 0.5)
    assert opt.majority_vote([1, 3], scores) == (3, 0.5)  # tie -> higher option score
    assert opt.majority_vote([None, None], scores) == (4, 0.0)


def test_cloze_scores_mean_and_pmi_by_hand():
    option_logps = [np.array([-1.0, -3.0]), np.array([-2.0]), np.array([-0.5, -0.5, -0.5])]
    # length-normalised: the mean token log-prob
    assert opt.cloze_scores(option_logps) == pytest.approx([-2.0, -2.0, -0.5])
    # PMI: summed log-prob minus the summed content-free log-prob of the same text
    free = [np.array([-1.0, -1.0]), np.array([-5.0]), np.array([-0.1, -0.1, -0.1])]
    assert opt.cloze_scores(option_logps, free) == pytest.approx([-2.0, 3.0, -1.2])
    with pytest.raises(ValueError, match="at least one scored token"):
        opt.cloze_scores([np.array([-1.0]), np.array([])])
    with pytest.raises(ValueError, match="one array per option"):
        opt.cloze_scores(option_logps, free[:2])


def test_combine_scores_is_a_product_of_the_normalised_distributions():
    label = np.log([0.5, 0.5])
    cloze = np.array([0.0, math.log(3.0)])  # normalises to 1/4, 3/4
    got = opt.combine_scores(label, cloze)
    assert got == pytest.approx([math.log(0.5 * 0.25), math.log(0.5 * 0.75)])
    # one part alone is that part, normalised; a uniform part never changes the argmax
    assert opt.combine_scores(None, cloze) == pytest.approx(np.log([0.25, 0.75]))
    assert np.argmax(opt.combine_scores(np.zeros(2), cloze)) == 1
    with pytest.raises(ValueError, match="need label scores"):
        opt.combine_scores(None, None)
