"""Metric definitions against matrices computed by hand."""

from __future__ import annotations

import pytest

from incremental.metrics import avalanche_forgetting, bwt, forgetting, seen_accuracy, summarize

# A[i][j]: after experience i, on experience j.
A = [
    [90.0],
    [70.0, 80.0],
    [60.0, 85.0, 50.0],
]
SIZES = [100, 100, 200]


def test_seen_accuracy_is_sample_weighted():
    assert seen_accuracy(A, SIZES) == pytest.approx([90.0, 75.0, (60 * 100 + 85 * 100 + 50 * 200) / 400])


def test_forgetting_is_max_based():
    f = forgetting(A)
    # step 1: exp 0 90 -> 70 = 20; step 2: exp 0 max(90, 70) - 60 = 30, exp 1 max(80) - 85 = -5
    assert f["per_step"] == pytest.approx([None, 20.0, 12.5])
    assert f["per_experience"] == pytest.approx([30.0, -5.0])
    assert f["mean"] == pytest.approx(12.5)


def test_max_based_differs_from_first_minus_last():
    matrix = [[50.0], [90.0, 80.0], [40.0, 80.0, 70.0]]  # exp 0 improves before it is forgotten
    assert forgetting(matrix)["per_experience"] == pytest.approx([50.0, 0.0])
    assert avalanche_forgetting(matrix)["final"] == pytest.approx(((50 - 40) + (80 - 80)) / 2)


def test_bwt():
    b = bwt(A)
    assert b["per_step"] == pytest.approx([None, -20.0, ((60 - 90) + (85 - 80)) / 2])
    assert b["final"] == pytest.approx(-12.5)
    assert avalanche_forgetting(A)["final"] == pytest.approx(12.5)  # = -bwt


def test_summary_of_a_run():
    s = summarize(A, SIZES)
    assert s["average_incremental_accuracy"] == pytest.approx((90 + 75 + 61.25) / 3)
    assert s["last_accuracy"] == pytest.approx(61.25)
    assert s["accuracy_old"] == pytest.approx([None, 70.0, 72.5])
    assert s["accuracy_new"] == [90.0, 80.0, 50.0]


def test_single_experience_has_no_forgetting():
    s = summarize([[77.0]], [10])
    assert s["forgetting"]["mean"] is None and s["bwt"]["final"] is None and s["last_accuracy"] == 77.0


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError, match="row 1"):
        forgetting([[1.0], [1.0]])
