"""Metric definitions against matrices computed by hand."""

from __future__ import annotations

import pytest

from incremental.metrics import (avalanche_forgetting, bwt, forgetting, seen_accuracy, summarize, task_identification,
                                 task_il_summary)

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


# P[j][k] after step 2: test images of experience j predicted as a class of experience k
PREDICTIONS = [
    [[100]],
    [[60, 40], [5, 95]],
    [[50, 20, 30], [10, 80, 10], [20, 20, 160]],
]


def test_task_identification_is_the_diagonal_share_of_the_prediction_matrix():
    assert task_identification(PREDICTIONS[1]) == pytest.approx(100 * (60 + 95) / 200)
    assert task_identification(PREDICTIONS[2]) == pytest.approx(100 * (50 + 80 + 160) / 400)
    assert task_identification([[0]]) is None


def test_task_il_accuracy_is_sample_weighted_and_rows_may_be_missing():
    task_il = [[95.0], [90.0, 99.0], None]  # a step recorded before task-IL existed (a resumed old run)
    summary = task_il_summary(task_il, SIZES, PREDICTIONS)
    assert summary["task_il_accuracy"][:2] == pytest.approx([95.0, 94.5]) and summary["task_il_accuracy"][2] is None
    assert summary["task_il_accuracy_matrix"][2] is None
    assert summary["task_identification"] == pytest.approx([100.0, 77.5, 72.5])


def test_task_il_hits_take_the_argmax_within_the_experience():
    import torch

    from incremental.training.plugins import task_il_hits

    label_experience = torch.tensor([0, 0, 1, 1, 2])  # classes 0-1: experience 0, 2-3: 1, 4: 2
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0, 9.0],   # class 1 over 0 within exp 0; column 5 is no class
                           [3.0, 1.0, 5.0, 2.0, 0.0, 0.0],   # class 0 within exp 0
                           [0.0, 0.0, 1.0, 2.0, 7.0, 0.0]])  # class 3 within exp 1
    labels = torch.tensor([1, 1, 3])
    assert int(task_il_hits(logits, labels, label_experience, 0)) == 1  # rows 0 and 1 are experience 0's
    assert int(task_il_hits(logits[2:], labels[2:], label_experience, 1)) == 1
    assert int(task_il_hits(logits[:, :3], labels, label_experience, 0)) == 1  # a head narrower than the order
