"""Every summary metric, derived from one accuracy matrix.

``A[i][j]`` is the accuracy (in percent) on the test samples of experience ``j`` after
training on experience ``i``, for ``j <= i``; ``n[j]`` is the number of test samples of
experience ``j``. With ``T`` experiences:

- ``accuracy[i]``: accuracy on all classes seen so far, ``sum_j<=i n[j] A[i][j] / sum_j<=i n[j]``
  (the "top-1 on seen classes" that iCaRL, PODNet and PyCIL plot).
- ``accuracy_old[i]`` / ``accuracy_new[i]``: the same over ``j < i`` / ``j == i``.
- ``average_incremental_accuracy``: ``mean_i accuracy[i]``, first step included (Rebuffi et al.).
- ``last_accuracy``: ``accuracy[T-1]``.
- ``forgetting`` (max-based, Chaudhry et al. 2018, as PyCIL and FACIL): for ``j < i``,
  ``f[i][j] = max_{j<=l<i} A[l][j] - A[i][j]``; ``per_step[i] = mean_j<i f[i][j]``;
  ``per_experience[j] = f[T-1][j]``; ``mean = per_step[T-1]``.
- ``bwt`` (Lopez-Paz and Ranzato 2017): ``per_step[i] = mean_j<i (A[i][j] - A[j][j])``;
  ``final = per_step[T-1]``.
- ``avalanche_forgetting``: Avalanche's first-minus-last forgetting,
  ``mean_j<i (A[j][j] - A[i][j])``, which is ``-bwt``; kept under its own name only.

Step 0 has no old experiences: its forgetting and BWT are ``None``.
"""

from __future__ import annotations

from typing import Any, Sequence

Matrix = Sequence[Sequence[float]]

DEFINITIONS = {
    "accuracy_matrix": "A[i][j]: accuracy (%) on the test classes of experience j after training experience i, j <= i",
    "accuracy": "per step i: accuracy (%) on the test samples of all classes seen so far (sample-weighted over A[i][:i+1])",
    "accuracy_old": "per step i: accuracy (%) on the test samples of experiences j < i",
    "accuracy_new": "per step i: A[i][i]",
    "average_incremental_accuracy": "mean over steps of accuracy, first step included",
    "last_accuracy": "accuracy after the last step",
    "forgetting": "max-based (Chaudhry 2018, PyCIL, FACIL): f[i][j] = max_{j<=l<i} A[l][j] - A[i][j]; "
                  "per_step[i] = mean_{j<i} f[i][j]; per_experience[j] = f[T-1][j]; mean = per_step[T-1]",
    "bwt": "backward transfer (Lopez-Paz 2017): per_step[i] = mean_{j<i} (A[i][j] - A[j][j]); final = per_step[T-1]",
    "avalanche_forgetting": "Avalanche's first-minus-last forgetting: mean_{j<i} (A[j][j] - A[i][j]) = -bwt",
    "prediction_matrix": "per step i, P[j][k]: test images of experience j predicted as a class of experience k",
    "task_il_accuracy_matrix": "TA[i][j]: accuracy (%) on the test images of experience j after training experience "
                               "i, j <= i, with the prediction taken as the argmax over experience j's classes only "
                               "(task-IL: the task is given, as Mammoth reports next to class-IL)",
    "task_il_accuracy": "per step i: task-IL accuracy (%) on the test samples of all classes seen so far "
                        "(sample-weighted over TA[i][:i+1])",
    "task_identification": "per step i: % of the test images of experiences j <= i whose predicted class (the "
                           "class-IL argmax) is one of their own experience's: sum_j P[j][j] / sum_j,k P[j][k]. "
                           "A class-IL hit needs both a task-IL hit and a right task, so accuracy <= both",
    "old_predicted_as_new": "per step i (ViTIL's bias diagnostic): % of the test images of experiences j < i "
                            "predicted as a class of experience i",
    "head_norm_ratio": "per step i (ViTIL's bias diagnostic): mean L2 norm of the classifier weight rows of the "
                       "classes of experience i / that of the classes of experiences j < i",
    "train_loss_per_epoch": "per step: mean training loss of each epoch (the convergence diagnostic)",
    "wall_time_s": "per step, seconds: train (the strategy's after-training work included, compilation "
                   "excluded), eval, probes, and the phases timed within training: compile (torch.compile), "
                   "kd_teacher (a distillation teacher's forward passes), balanced_finetuning, "
                   "exemplar_selection, feature_pass, closed_form, memory_encoding; and eval_earlier, the part of eval "
                   "spent on earlier experiences' test data; writing the run directory is not included",
    "trained_params": "per step: parameters the step's optimizer updated (0 for a step without gradient "
                      "steps; a strategy's own extra fitting, such as SLCA's alignment or BiC's bias layer, "
                      "is not counted)",
}


def old_predicted_as_new(prediction_matrix: Sequence[Sequence[int]]) -> float | None:
    """% of old-experience test images predicted as the newest experience's classes."""
    step = len(prediction_matrix) - 1
    old_rows = prediction_matrix[:step]
    total = sum(sum(row) for row in old_rows)
    return 100.0 * sum(row[step] for row in old_rows) / total if total else None


def task_identification(prediction_matrix: Sequence[Sequence[int]]) -> float | None:
    """% of the seen experiences' test images predicted as a class of their own experience."""
    total = sum(sum(row) for row in prediction_matrix)
    return 100.0 * sum(row[j] for j, row in enumerate(prediction_matrix)) / total if total else None


def task_il_summary(rows: Sequence[Sequence[float] | None], sizes: Sequence[int],
                    prediction_matrices: Sequence[Sequence[Sequence[int]] | None]) -> dict[str, Any]:
    """The task-IL accuracy matrix (None rows where a step did not record one), its per-step
    seen-class accuracy, and the per-step task-identification rate."""
    return {
        "task_il_accuracy_matrix": [None if row is None else list(map(float, row)) for row in rows],
        "task_il_accuracy": [None if row is None else _weighted(row, sizes[: len(row)]) for row in rows],
        "task_identification": [None if p is None else task_identification(p) for p in prediction_matrices],
    }


def _check(matrix: Matrix, sizes: Sequence[int] | None = None) -> None:
    for i, row in enumerate(matrix):
        if len(row) != i + 1:
            raise ValueError(f"row {i} of the accuracy matrix has {len(row)} entries, expected {i + 1}")
    if sizes is not None and len(sizes) < len(matrix):
        raise ValueError("fewer experience sizes than matrix rows")


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float | None:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else None


def seen_accuracy(matrix: Matrix, sizes: Sequence[int]) -> list[float]:
    _check(matrix, sizes)
    return [_weighted(row, sizes[: i + 1]) for i, row in enumerate(matrix)]  # type: ignore[misc]


def old_new_accuracy(matrix: Matrix, sizes: Sequence[int]) -> tuple[list[float | None], list[float]]:
    _check(matrix, sizes)
    old = [_weighted(row[:i], sizes[:i]) if i else None for i, row in enumerate(matrix)]
    new = [row[i] for i, row in enumerate(matrix)]
    return old, new


def forgetting_matrix(matrix: Matrix) -> list[list[float]]:
    """``f[i][j]`` for ``j < i`` (row 0 is empty)."""
    _check(matrix)
    return [[max(matrix[l][j] for l in range(j, i)) - matrix[i][j] for j in range(i)]
            for i in range(len(matrix))]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def forgetting(matrix: Matrix) -> dict[str, Any]:
    f = forgetting_matrix(matrix)
    per_step = [_mean(row) for row in f]
    return {"per_step": per_step, "per_experience": list(f[-1]) if f else [],
            "mean": per_step[-1] if per_step else None}


def bwt(matrix: Matrix) -> dict[str, Any]:
    _check(matrix)
    per_step = [_mean([matrix[i][j] - matrix[j][j] for j in range(i)]) for i in range(len(matrix))]
    return {"per_step": per_step, "final": per_step[-1] if per_step else None}


def avalanche_forgetting(matrix: Matrix) -> dict[str, Any]:
    _check(matrix)
    per_step = [_mean([matrix[j][j] - matrix[i][j] for j in range(i)]) for i in range(len(matrix))]
    return {"per_step": per_step, "final": per_step[-1] if per_step else None}


def summarize(matrix: Matrix, sizes: Sequence[int]) -> dict[str, Any]:
    """All summary metrics of a (possibly partial) run, from its accuracy matrix."""
    accuracy = seen_accuracy(matrix, sizes)
    old, new = old_new_accuracy(matrix, sizes)
    return {
        "accuracy_matrix": [list(map(float, row)) for row in matrix],
        "accuracy": accuracy,
        "accuracy_old": old,
        "accuracy_new": new,
        "average_incremental_accuracy": _mean(accuracy),
        "last_accuracy": accuracy[-1] if accuracy else None,
        "forgetting": forgetting(matrix),
        "bwt": bwt(matrix),
        "avalanche_forgetting": avalanche_forgetting(matrix),
    }


def step_scalars(step: int, metrics: dict[str, Any], step_info: dict[str, Any]) -> dict[str, float]:
    """Experience ``step``'s scalars under the tags every tracker logs (TensorBoard, W&B, MLflow,
    the CSV): the metrics above, the bias diagnostics, loss and times, each experience's accuracy,
    the memory's figures and the probes' summaries. Values that do not exist (forgetting at step 0)
    are left out."""
    values: dict[str, Any] = {
        "cil/accuracy": metrics["accuracy"][step],
        "cil/average_incremental_accuracy": sum(metrics["accuracy"][: step + 1]) / (step + 1),
        "cil/forgetting": metrics["forgetting"]["per_step"][step],
        "cil/bwt": metrics["bwt"]["per_step"][step],
        "cil/accuracy_old": metrics["accuracy_old"][step],
        "cil/accuracy_new": metrics["accuracy_new"][step],
        "cil/task_il_accuracy": (metrics.get("task_il_accuracy") or [None] * (step + 1))[step],
        "cil/task_identification": (metrics.get("task_identification") or [None] * (step + 1))[step],
        "bias/old_predicted_as_new": step_info.get("old_predicted_as_new"),
        "bias/head_norm_ratio": step_info.get("head_norm_ratio"),
        "train/loss": step_info.get("train_loss"),
        "time/train_s": step_info.get("train_s"),
        "time/eval_s": step_info.get("eval_s"),
    }
    for j, accuracy in enumerate(metrics["accuracy_matrix"][step]):
        values[f"accuracy_per_experience/exp_{j:02d}"] = accuracy
    for key, value in (step_info.get("memory") or {}).items():
        values[f"memory/{key}"] = value
    for label, result in (step_info.get("probes") or {}).items():
        if result is not None:
            values.update({f"probes/{label}/{key}": value for key, value in result["summary"].items()})
            values[f"probes/{label}/time_s"] = result["time_s"]
    return {tag: float(value) for tag, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
