"""Plain-text progress lines and the end-of-run table."""

from __future__ import annotations

from typing import Any


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _classes(classes: list[int]) -> str:
    if len(classes) <= 4:
        return ",".join(map(str, classes))
    return f"{len(classes)} classes"


def format_step(metrics: dict[str, Any], step: int) -> str:
    total = metrics["num_experiences"]
    avg = sum(metrics["accuracy"][: step + 1]) / (step + 1)
    time_s = metrics["wall_time_s"][step]
    # numbered from 0, as in the table, metrics.json and TensorBoard
    return (f"exp {step} of 0-{total - 1}  acc {_pct(metrics['accuracy'][step])}  avg {avg:.2f}  "
            f"old {_pct(metrics['accuracy_old'][step])}  new {_pct(metrics['accuracy_new'][step])}  "
            f"forgetting {_pct(metrics['forgetting']['per_step'][step])}  "
            f"({time_s['train']:.1f}s train, {time_s['eval']:.1f}s eval"
            + (f", {time_s['probes']:.1f}s probes)" if time_s.get("probes") else ")"))


def step_seconds(time_s: dict[str, float]) -> float:
    """A step's wall time: train, eval, probes and compilation (the other phases are inside them)."""
    return sum(time_s.get(key, 0.0) for key in ("train", "eval", "probes", "compile"))


def format_table(metrics: dict[str, Any]) -> str:
    """One row per experience, then the run's summary numbers (accuracies in %)."""
    header = ["exp", "classes", "train n", "acc", "avg inc", "old", "new", "forget", "bwt", "loss", "time s"]
    rows = []
    for i in range(metrics["completed_experiences"]):
        loss = metrics["train_loss"][i]
        rows.append([
            str(i), _classes(metrics["experiences"][i]), str(metrics["train_samples"][i] or "-"),
            _pct(metrics["accuracy"][i]), _pct(sum(metrics["accuracy"][: i + 1]) / (i + 1)),
            _pct(metrics["accuracy_old"][i]), _pct(metrics["accuracy_new"][i]),
            _pct(metrics["forgetting"]["per_step"][i]), _pct(metrics["bwt"]["per_step"][i]),
            "-" if loss is None else f"{loss:.3f}",
            f"{step_seconds(metrics['wall_time_s'][i]):.1f}",
        ])
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("")
    lines.append(f"average incremental accuracy {_pct(metrics['average_incremental_accuracy'])}   "
                 f"last accuracy {_pct(metrics['last_accuracy'])}   "
                 f"forgetting {_pct(metrics['forgetting']['mean'])}   bwt {_pct(metrics['bwt']['final'])}   "
                 f"({metrics['status']}, {metrics['total_wall_time_s']:.0f}s)")
    return "\n".join(lines)
