"""A run's results: the accuracy matrix and per-step records, and metrics.json built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig, probe_labels

METRICS_FORMAT = 1


def without_wall_clock(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json minus its wall-clock times (``wall_time_s``, ``total_wall_time_s``, the
    ``torch_threads`` they ran on and each probe result's ``time_s``): what two runs of one config
    and seed, or a resumed run and an uninterrupted one, have in common to the bit on the CPU."""
    kept = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "total_wall_time_s", "torch_threads")}
    kept["probes"] = {label: [None if r is None else {k: v for k, v in r.items() if k != "time_s"} for r in results]
                      for label, results in metrics.get("probes", {}).items()}
    return kept


@dataclass
class RunResults:
    """The accuracy matrix and per-step records of a run, and metrics.json built from them."""

    cfg: RunConfig
    class_order: list[int]
    experiences: list[list[int]]
    class_names: list[str]
    test_sizes: list[int]
    matrix: list[list[float]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    backbone_report: dict[str, Any] = field(default_factory=dict)  # pretrained weights, compression

    def add(self, row: list[float], info: dict[str, Any]) -> None:
        self.matrix.append(row)
        self.steps.append(info)

    def truncate(self, completed: int) -> None:
        """Keep the first ``completed`` experiences: those whose writes are durable."""
        del self.matrix[completed:], self.steps[completed:]

    def to_json(self) -> dict[str, Any]:
        from ..metrics import DEFINITIONS, summarize, task_il_summary
        from ..probes import DEFINITIONS as PROBE_DEFINITIONS

        summary = summarize(self.matrix, self.test_sizes)
        predictions = [s.get("prediction_matrix") for s in self.steps]
        task_il = task_il_summary([s.get("task_il_accuracies") for s in self.steps], self.test_sizes, predictions)
        return {
            "format": METRICS_FORMAT,
            "name": self.cfg.name,
            "status": self.status,
            "completed_experiences": len(self.matrix),
            "num_experiences": len(self.experiences),
            "seed": self.cfg.seed,
            "dataset": self.cfg.dataset.name,
            "backbone": self.cfg.backbone.name,
            "strategy": self.cfg.strategy.name,
            "class_order": self.class_order,
            "class_names": [self.class_names[c] for c in self.class_order],
            "experiences": self.experiences,
            "test_samples_per_experience": self.test_sizes,
            **summary,
            **task_il,
            "train_loss": [s.get("train_loss") for s in self.steps],
            "train_loss_per_epoch": [s.get("train_loss_per_epoch") for s in self.steps],
            "prediction_matrix": predictions,
            "old_predicted_as_new": [s.get("old_predicted_as_new") for s in self.steps],
            "head_norm_ratio": [s.get("head_norm_ratio") for s in self.steps],
            "train_samples": [s.get("train_samples") for s in self.steps],
            "trained_params": [s.get("trained_params") for s in self.steps],
            "wall_time_s": [{"train": s["train_s"], "eval": s["eval_s"], "probes": s.get("probe_s", 0.0),
                             **(s.get("phase_s") or {})} for s in self.steps],
            "torch_threads": [s.get("torch_threads") for s in self.steps],  # what the wall times ran on
            "total_wall_time_s": sum(s["train_s"] + s["eval_s"] + s.get("probe_s", 0.0)
                                     + (s.get("phase_s") or {}).get("compile", 0.0) for s in self.steps),
            # {label: [result after experience i, or None where the probe did not run]}
            "probes": {label: [(s.get("probes") or {}).get(label) for s in self.steps]
                       for label in probe_labels(self.cfg.probes)},
            # what the memory holds after each experience (None: no memory): bytes, budget_bytes,
            # exemplars, psnr_db (of the decoded exemplars; null when lossless), and for
            # generative replay the generated samples' accuracy and Frechet distance
            "memory": [s.get("memory") for s in self.steps],
            "backbone_report": self.backbone_report,
            "definitions": {**DEFINITIONS, **(PROBE_DEFINITIONS if self.cfg.probes else {})},
        }
