"""CL metrics (spec §8) on hand-computed matrices."""

import math

import numpy as np
import pytest

from aimm.metrics import bwt, cl_metrics, forgetting, fwt, op, seen_average_curve, task1_curve

NAN = float("nan")

# 2 tasks: task 0 drops 0.8 -> 0.6 after task 1.
S2 = [[0.8, NAN], [0.6, 0.9]]

# 3 tasks; task 0 *improves* after task 1 (0.95) before dropping, so forgetting (max over rows)
# differs from -BWT (diagonal only).
S3 = [[0.9, NAN, NAN], [0.95, 0.8, NAN], [0.6, 0.7, 0.9]]


def test_two_tasks():
    m = cl_metrics(S2)
    assert m["OP"] == pytest.approx(0.75)
    assert m["BWT"] == pytest.approx(-0.2)
    assert m["FWT"] is None
    assert m["forgetting"] == pytest.approx(0.2)
    assert set(m) == {"OP", "BWT", "FWT", "forgetting"}
    assert all(isinstance(v, float) for k, v in m.items() if k != "FWT")


def test_two_tasks_single_task_and_denominator():
    m = cl_metrics(S2, single_task=[0.7, 0.85], bwt_denominator="T")
    assert m["FWT"] == pytest.approx(((0.8 - 0.7) + (0.9 - 0.85)) / 2)
    assert m["BWT"] == pytest.approx(-0.2 / 2)


def test_three_tasks_nan_upper_triangle():
    m = cl_metrics(S3, single_task=np.array([0.85, 0.8, 1.0]))
    assert m["OP"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert bwt(S3, "T") == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 3)
    # max over j < T-1: task 0 peaked at 0.95 (row 1), task 1 at 0.8
    assert m["forgetting"] == pytest.approx(((0.95 - 0.6) + (0.8 - 0.7)) / 2)
    assert m["FWT"] == pytest.approx(((0.9 - 0.85) + (0.8 - 0.8) + (0.9 - 1.0)) / 3)
    assert task1_curve(S3) == pytest.approx([0.9, 0.95, 0.6])
    assert seen_average_curve(S3) == pytest.approx([0.9, 0.875, (0.6 + 0.7 + 0.9) / 3])


def test_upper_triangle_is_ignored_even_when_filled():
    filled = np.array(S3)
    filled[np.triu_indices(3, k=1)] = 0.99  # zero-shot scores before training: not used
    assert cl_metrics(filled) == pytest.approx(cl_metrics(S3), nan_ok=True)
    assert forgetting(filled) == pytest.approx(0.225)


def test_helpers_match_cl_metrics_and_accept_none():
    with_none = [[0.9, None, None], [0.95, 0.8, None], [0.6, 0.7, 0.9]]
    assert op(with_none) == pytest.approx(op(S3))
    assert fwt(S3, [0.9, 0.8, 0.9]) == pytest.approx(0.0)
    assert forgetting(with_none) == pytest.approx(0.225)


def test_single_task_matrix():
    m = cl_metrics([[0.7]], single_task=[0.5])
    assert m["OP"] == pytest.approx(0.7)
    assert m["FWT"] == pytest.approx(0.2)
    assert math.isnan(m["BWT"]) and math.isnan(m["forgetting"])


def test_partial_matrix_diagonal_and_last_row_only():
    partial = [[0.9, NAN, NAN], [NAN, 0.8, NAN], [0.6, 0.7, 0.9]]
    assert op(partial) == pytest.approx(op(S3))
    assert bwt(partial) == pytest.approx(bwt(S3))
    with pytest.raises(ValueError, match=r"scores\[1\]\[0\]"):
        forgetting(partial)
    with pytest.raises(ValueError, match="forgetting"):
        cl_metrics(partial)
    # lower bound from the rows present: task 0's max is its diagonal 0.9
    assert forgetting(partial, allow_partial=True) == pytest.approx(((0.9 - 0.6) + 0.1) / 2)
    assert cl_metrics(partial, allow_partial=True)["forgetting"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "square"),
        ([0.1, 0.2], "square"),
        ([], "square"),
        ([[0.1, 0.2], [0.3]], "matrix"),
        ([[NAN, NAN], [0.5, 0.6]], r"BWT needs scores\[0\]\[0\]"),
        ([[0.5, NAN], [0.5, NAN]], r"OP needs scores\[1\]\[1\]"),
    ],
)
def test_invalid_matrices(bad, match):
    with pytest.raises(ValueError, match=match):
        cl_metrics(bad)


def test_invalid_single_task_and_denominator():
    with pytest.raises(ValueError, match="one score per task"):
        cl_metrics(S3, single_task=[0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        cl_metrics(S2, single_task=[0.5, NAN])
    with pytest.raises(ValueError, match="bwt_denominator"):
        cl_metrics(S2, bwt_denominator="N")
    with pytest.raises(ValueError, match=r"task1_curve needs scores\[1\]\[0\]"):
        task1_curve([[0.5, NAN], [NAN, 0.5]])
