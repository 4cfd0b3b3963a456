"""utils/scores.py on hand-computed accuracies (fractions in [0, 1])."""

import math

import pytest

from utils.io import UserError
from utils.scores import (
    SCORE_ROWS,
    ars,
    ars_beta,
    check_full_accuracy,
    hlr,
    ior,
    lrs,
    lrs_alpha,
    normalised,
    robust_scores,
)

E = math.e


def test_alpha_zero_gives_the_constant():
    # IOR = 0.1, HLR = 0.1: alpha = 0.5 * 0.1 - 0.5 * 0.1 = 0
    assert lrs_alpha(0.8, 0.7, 0.5, 0.4) == pytest.approx(0.0)
    assert lrs(0.8, 0.7, 0.5, 0.4) == pytest.approx((1 - E**-1) / (E - E**-1))
    assert normalised(0.0) == pytest.approx(0.2689414213699951)  # 1 / (1 + e), by hand


def test_equal_syn_and_random_give_ior_zero():
    assert ior(0.37, 0.37) == 0.0
    # then alpha = -0.5 HLR: full 0.9, syn_hard 0.5 -> alpha = -0.2
    assert lrs(0.9, 0.5, 0.37, 0.37) == pytest.approx((E**-0.2 - E**-1) / (E - E**-1))


def test_hand_computed_values():
    assert hlr(0.848, 0.30) == pytest.approx(0.548)
    assert ior(0.45, 0.20) == pytest.approx(0.25)
    # alpha = 0.5 * 0.25 - 0.5 * 0.548 = -0.149
    assert lrs(0.848, 0.30, 0.45, 0.20) == pytest.approx((E**-0.149 - E**-1) / (E - E**-1))
    # beta = 0.5 * (0.45 - 0.20) + 0.5 * (0.40 - 0.10) = 0.275
    assert ars_beta(0.45, 0.20, 0.40, 0.10) == pytest.approx(0.275)
    assert ars(0.45, 0.20, 0.40, 0.10) == pytest.approx((E**0.275 - E**-1) / (E - E**-1))
    # the ends of the range
    assert lrs(1.0, 0.0, 0.0, 1.0) == pytest.approx(0.0)  # alpha = -1
    assert ars(1.0, 0.0, 1.0, 0.0) == pytest.approx(1.0)  # beta = 1
    # another weight: w = 1 is IOR alone
    assert lrs(0.9, 0.1, 0.6, 0.4, w=1.0) == pytest.approx(normalised(0.2))


def test_percentages_are_refused():
    with pytest.raises(UserError, match="fraction"):
        lrs(84.8, 30.0, 45.0, 20.0)


@pytest.mark.parametrize("value", [0, -1, 100.5, float("nan"), float("inf")])
def test_full_accuracy_outside_0_100_is_a_user_error(value):
    with pytest.raises(UserError, match=r"outside \(0, 100\]"):
        check_full_accuracy(value)


def test_full_accuracy_at_100_is_fine():
    assert check_full_accuracy(100) == 100


def test_robust_scores_pair_the_networks():
    accs = {row: [40.0, 50.0] for row in SCORE_ROWS}
    accs["random"] = [20.0, 20.0]
    accs["random_naug"] = [30.0, 10.0]
    scores = robust_scores(accs, 90.0)
    # network 0: IOR 0.2, HLR 0.5, alpha -0.15; network 1: IOR 0.3, HLR 0.4, alpha -0.05
    assert scores["ior"]["values"] == pytest.approx([0.2, 0.3])
    assert scores["hlr"]["values"] == pytest.approx([0.5, 0.4])
    expected = [normalised(-0.15), normalised(-0.05)]
    assert scores["lrs"]["values"] == pytest.approx(expected)
    assert scores["lrs"]["mean"] == pytest.approx(sum(expected) / 2)
    assert scores["lrs"]["std"] == pytest.approx(abs(expected[0] - expected[1]) / 2)
    # beta: 0.5 * 0.2 + 0.5 * 0.1 = 0.15 and 0.5 * 0.3 + 0.5 * 0.4 = 0.35
    assert scores["ars"]["values"] == pytest.approx([normalised(0.15), normalised(0.35)])
