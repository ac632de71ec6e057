"""TensorBoard curves whose step is the experience index.

Tags (all accuracies in percent):
``cil/accuracy`` (seen classes), ``cil/average_incremental_accuracy``, ``cil/forgetting``
(max-based mean), ``cil/bwt``, ``cil/accuracy_old``, ``cil/accuracy_new``,
``accuracy_per_experience/exp_XX``, ``train/loss``, ``time/train_s``, ``time/eval_s``, and
the image ``cil/accuracy_matrix``; probes add ``probes/LABEL/KEY`` scalars and
``probes/LABEL/IMAGE`` heat maps. A custom-scalars layout puts each metric of every run in
one chart, and the HParams tab filters runs by strategy, backbone, seed and the main
training settings. Point ``tensorboard --logdir`` at the folder holding
several run directories to overlay them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

SCALAR_TAGS = ("cil/accuracy", "cil/average_incremental_accuracy", "cil/forgetting", "cil/bwt",
               "cil/accuracy_old", "cil/accuracy_new")


def render_heat_map(grid: np.ndarray, title: str, *, vmin: float | None = None, vmax: float | None = None,
                    cmap: str = "viridis", colorbar_label: str = "", axis_labels: tuple[str, str] = ("", ""),
                    extent: tuple[float, float, float, float] | None = None,
                    figsize: tuple[float, float] = (4.2, 3.6), title_size: float | None = 9,
                    annotate: bool = False) -> np.ndarray:
    """A 2-D array as a heat map image, HxWx3 uint8, rendered off-screen whatever backend
    pyplot would pick. ``annotate`` writes each finite value in its cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap=cmap, extent=extent)
    if annotate:  # light text on the dark lower 60% of the colour scale
        low, high = np.nanmin(grid) if vmin is None else vmin, np.nanmax(grid) if vmax is None else vmax
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if value < low + 0.6 * (high - low) else "black")
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    fig.colorbar(image, ax=ax, fraction=0.046, label=colorbar_label)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_accuracy_matrix(matrix: Sequence[Sequence[float]], title: str = "") -> np.ndarray:
    """The lower-triangular accuracy matrix as an annotated heat map, HxWx3 uint8."""
    n = len(matrix)
    grid = np.full((n, n), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = row
    size = min(12.0, 1.2 + 0.55 * n)
    return render_heat_map(grid, title or "accuracy (%)", vmin=0, vmax=100, figsize=(size + 1.0, size),
                           title_size=None, annotate=n <= 20,
                           axis_labels=("evaluated experience j", "after training experience i"))


# Custom-scalars layout: one chart per metric with every run's curve in it, whichever runs
# TensorBoard is pointed at (the regexes match the tags of all runs).
LAYOUT = {
    "incremental": {
        "accuracy on seen classes": ["Multiline", [r"^cil/accuracy$"]],
        "average incremental accuracy": ["Multiline", [r"^cil/average_incremental_accuracy$"]],
        "forgetting (max-based)": ["Multiline", [r"^cil/forgetting$"]],
        "backward transfer": ["Multiline", [r"^cil/bwt$"]],
        "old and new classes": ["Multiline", [r"^cil/accuracy_old$", r"^cil/accuracy_new$"]],
        # forgetting inside each task against confusion between tasks
        "class-IL, task-IL and task identification": ["Multiline", [r"^cil/accuracy$", r"^cil/task_il_accuracy$",
                                                                     r"^cil/task_identification$"]],
    },
    "probes": {
        "corrupted accuracy": ["Multiline", [r"^probes/.*/mean_accuracy$"]],
        "occlusion": ["Multiline", [r"^probes/.*/(cutout|patch_drop)/"]],
        "adversarial accuracy": ["Multiline", [r"^probes/.*/(linf|l2)/"]],
        "OOD AUROC": ["Multiline", [r"^probes/.*/(worst_)?auroc/"]],
    },
}
HPARAM_METRICS = ("cil/average_incremental_accuracy", "cil/accuracy", "cil/forgetting", "cil/bwt")


def run_hparams(cfg: Any) -> dict[str, Any]:
    """What TensorBoard's HParams tab filters runs by."""
    memory = cfg.protocol.memory
    values = {"strategy": cfg.strategy.name, "backbone": cfg.backbone.name, "dataset": cfg.dataset.name,
              "seed": cfg.seed, "lr": cfg.training.optimizer.lr, "optimizer": cfg.training.optimizer.name,
              "epochs": cfg.training.epochs, "batch_size": cfg.training.batch_size,
              "memory": memory.total if memory.total is not None else (memory.per_class or 0),
              "memory_bytes": memory.bytes or 0,
              "initial_classes": cfg.protocol.initial_classes, "name": cfg.name or ""}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}


class TensorBoardWriter:
    def __init__(self, log_dir: Path, hparams: dict[str, Any] | None = None, purge_step: int | None = None):
        """``purge_step``: when resuming, hide what an earlier writer logged at this step and later."""
        from torch.utils.tensorboard import SummaryWriter

        resumed = purge_step is not None and any(Path(log_dir).glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if resumed:
            return  # the layout and hparams are in the first event file already
        self.writer.add_custom_scalars(LAYOUT)
        if hparams:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run's own event file (SummaryWriter.add_hparams would open a
            # second run): the HParams tab reads the metric tags' values from this run.
            for summary in hparams_summary(hparams, {tag: 0.0 for tag in HPARAM_METRICS}):
                self.writer.file_writer.add_summary(summary)

    def log_step(self, step: int, metrics: dict[str, Any], step_info: dict[str, Any]) -> None:
        from .metrics import step_scalars

        memory_and_probes = ("memory/", "probes/")  # logged by log_memory and log_probes, with their images
        for tag, value in step_scalars(step, metrics, step_info).items():
            if not tag.startswith(memory_and_probes):
                self.writer.add_scalar(tag, value, global_step=step)
        image = render_accuracy_matrix(metrics["accuracy_matrix"], f"accuracy (%) after experience {step}")
        self.writer.add_image("cil/accuracy_matrix", image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def log_memory(self, step: int, report: dict[str, Any] | None, images: dict[str, np.ndarray]) -> None:
        """``memory/KEY`` scalars (bytes, exemplars, PSNR, generated-sample quality) and images."""
        for key, value in (report or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"memory/{key}", value, global_step=step)
        for name, image in images.items():
            self.writer.add_image(f"memory/{name}", image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def log_probes(self, step: int, results: dict[str, Any], images: dict[str, dict[str, np.ndarray]]) -> None:
        """``probes/LABEL/KEY`` scalars and ``probes/LABEL/IMAGE`` heat maps at this step."""
        for label, result in results.items():
            if result is None:
                continue
            for key, value in result["summary"].items():
                if value is not None:
                    self.writer.add_scalar(f"probes/{label}/{key}", value, global_step=step)
            self.writer.add_scalar(f"probes/{label}/time_s", result["time_s"], global_step=step)
            for name, image in images.get(label, {}).items():
                self.writer.add_image(f"probes/{label}/{name}", image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
