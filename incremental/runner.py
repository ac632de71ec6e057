"""Runs one class-incremental protocol: one SupervisedTemplate, the strategy as a plugin.

After every experience the model is evaluated on the test data of every experience seen so
far; the row of the accuracy matrix is added, every metric recomputed from the matrix, and
``metrics.json`` rewritten atomically, so a run that stops midway keeps what it finished.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, dump_yaml, probe_labels
from .errors import ConfigError, UserError

METRICS_FORMAT = 1
MODEL_FILE = "model.safetensors"  # the model after the last completed experience


def default_run_dir(cfg: RunConfig, suffix: str = "") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{cfg.name}{suffix}-{stamp}"


def prepare_run_dir(run_dir: Path, marker: str = "metrics.json") -> None:
    """Create the run directory; refuse one that already holds a run's results (``marker``)."""
    if (run_dir / marker).exists():
        raise UserError(f"{run_dir} already holds a run ({marker}); choose another --out", key="--out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {run_dir}: {exc.strerror or exc}", key="--out") from None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def save_model(model: Any, path: Path, *, experience: int) -> None:
    """The model's state dict as safetensors (no pickle), replaced atomically, with the
    experience it was trained up to and its class count in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"experience": str(experience), "num_classes": str(model.num_classes),
                                         "format": "incremental-vit model"})
    os.replace(tmp, path)


def hide_avalanche_deprecations() -> None:
    """Inside a ``catch_warnings`` block: drop the deprecation warnings raised inside Avalanche's
    own code on every experience (nothing a user can act on). Its ``@deprecated``
    decorator re-inserts a "once" filter at every call, ahead of any ignore filter, so the
    warnings are dropped at display time instead; every other warning is shown as usual."""
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, *args: Any, **kwargs: Any) -> None:
        if f"{os.sep}avalanche{os.sep}" in filename and (
                issubclass(category, DeprecationWarning) or "non-tuple sequence" in str(message)):
            return  # the second: torch's indexing deprecation, inside Avalanche's EWC
        shown(message, category, filename, *args, **kwargs)

    warnings.showwarning = show


def resolve_device(requested: str) -> Any:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("cuda requested but no CUDA device is available", key="training.device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


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

    def to_json(self) -> dict[str, Any]:
        from .metrics import DEFINITIONS, summarize
        from .probes import DEFINITIONS as PROBE_DEFINITIONS

        summary = summarize(self.matrix, self.test_sizes)
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
            "train_loss": [s.get("train_loss") for s in self.steps],
            "train_loss_per_epoch": [s.get("train_loss_per_epoch") for s in self.steps],
            "prediction_matrix": [s.get("prediction_matrix") for s in self.steps],
            "old_predicted_as_new": [s.get("old_predicted_as_new") for s in self.steps],
            "head_norm_ratio": [s.get("head_norm_ratio") for s in self.steps],
            "train_samples": [s.get("train_samples") for s in self.steps],
            "wall_time_s": [{"train": s["train_s"], "eval": s["eval_s"], "probes": s.get("probe_s", 0.0)}
                            for s in self.steps],
            "total_wall_time_s": sum(s["train_s"] + s["eval_s"] + s.get("probe_s", 0.0) for s in self.steps),
            # {label: [result after experience i, or None where the probe did not run]}
            "probes": {label: [(s.get("probes") or {}).get(label) for s in self.steps]
                       for label in probe_labels(self.cfg.probes)},
            "backbone_report": self.backbone_report,
            "definitions": {**DEFINITIONS, **(PROBE_DEFINITIONS if self.cfg.probes else {})},
        }


def run(cfg: RunConfig, run_dir: Path, *, quiet: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol of ``cfg`` into ``run_dir``; returns the final metrics."""
    prepare_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))

    import torch
    from avalanche.training.determinism.rng_manager import RNGManager
    from avalanche.training.templates import SupervisedTemplate

    from .data import build_dataset
    from .models import build_model
    from .models.compress import compression_plugins
    from .metrics import old_predicted_as_new
    from .models.net import describe, describe_build, head_norm_ratio
    from .plugins import EvaluationRecorder, OptimizationPlugin, ProgressBars, silent_evaluator
    from .protocol import build_benchmark, make_class_split
    from .registry import STRATEGIES
    from .strategy import StrategyContext
    from .summary import format_step, format_table

    RNGManager.set_random_seeds(cfg.seed)
    device = resolve_device(cfg.training.device)
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    class_split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    benchmark = build_benchmark(splits, class_split)
    model = build_model(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size,
                        initial_classes=class_split.classes_per_experience[0])
    context = StrategyContext(config=cfg, class_split=class_split, benchmark=benchmark, device=device)
    compression, compression_hooks = compression_plugins(cfg.backbone, model, in_chans=splits.channels,
                                                         img_size=splits.image_size, device=device)
    context.param_group_hooks.extend(compression_hooks)
    probe_suite = None
    if cfg.probes:
        from .probes.base import ProbeData
        from .probes.suite import ProbeSuite

        probe_data = ProbeData(splits, class_split.class_order, class_split.classes_per_experience, cfg.seed)
        probe_suite = ProbeSuite(cfg.probes, probe_data, class_split.num_experiences,
                                 echo=None if quiet else echo)
    strategy_plugins = STRATEGIES.get(cfg.strategy.name).obj(cfg.strategy.config, context)
    if not isinstance(strategy_plugins, (list, tuple)):
        strategy_plugins = [strategy_plugins]
    optimization = OptimizationPlugin(cfg.training, context.param_group_hooks)
    recorder = EvaluationRecorder(class_split.label_experience())
    template = SupervisedTemplate(
        model=model,
        # A placeholder: OptimizationPlugin builds the real optimizer at every experience.
        optimizer=torch.optim.SGD(model.parameters(), lr=cfg.training.optimizer.lr),
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing),
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        device=device,
        # Compression plugins come after the strategy's: the int8 copy replaces the model
        # for evaluation once the strategy has finished its own before_eval work.
        # Probes come after both, so they see the fp32 model once evaluation is over.
        plugins=[optimization, *strategy_plugins, *compression, recorder,
                 *([probe_suite] if probe_suite is not None else []), ProgressBars(enabled=not quiet)],
        evaluator=silent_evaluator(),
    )

    test_sizes = [len(exp.dataset) for exp in benchmark.test_stream]
    results = RunResults(cfg, list(class_split.class_order), class_split.experiences, splits.class_names, test_sizes)
    results.backbone_report = model.build_report
    writer = None
    if cfg.output.tensorboard:
        from .tensorboard import TensorBoardWriter, run_hparams
        writer = TensorBoardWriter(run_dir, run_hparams(cfg))
    if not quiet:
        echo(f"run {cfg.name}: {cfg.dataset.name}, {class_split.num_experiences} experiences "
             f"{list(class_split.classes_per_experience)}, strategy {cfg.strategy.name}, "
             f"backbone {cfg.backbone.name} ({describe(model)}), device {device}")
        for line in describe_build(model.build_report):
            echo(line)
        echo(f"writing to {run_dir}")

    metrics: dict[str, Any] = {}
    try:
        for i, experience in enumerate(benchmark.train_stream):
            template.train_epochs = cfg.training.initial_epochs if (i == 0 and cfg.training.initial_epochs) \
                else cfg.training.epochs
            start = time.perf_counter()
            with warnings.catch_warnings():
                hide_avalanche_deprecations()
                template.train(experience, eval_streams=[], reset_optimizer_state=True,
                               num_workers=cfg.training.num_workers)
                train_s = time.perf_counter() - start
                template.eval(benchmark.test_stream[: i + 1], num_workers=cfg.training.num_workers)
            probe_s = sum(probe_suite.last_seconds.values()) if probe_suite is not None else 0.0
            eval_s = time.perf_counter() - start - train_s - probe_s
            predictions = recorder.prediction_matrix(i + 1)
            info = {"train_s": train_s, "eval_s": eval_s, "train_loss": recorder.train_loss,
                    "train_samples": recorder.train_samples, "train_loss_per_epoch": recorder.epoch_losses,
                    "prediction_matrix": predictions, "old_predicted_as_new": old_predicted_as_new(predictions),
                    "head_norm_ratio": head_norm_ratio(template.model, class_split.label_ranges(), i),
                    "probe_s": probe_s, "probes": probe_suite.last_results if probe_suite is not None else {}}
            results.add(recorder.accuracies(i + 1), info)
            if i == class_split.num_experiences - 1:
                results.status = "complete"
            metrics = results.to_json()
            write_json_atomic(run_dir / "metrics.json", metrics)
            if cfg.output.save_model:
                save_model(template.model, run_dir / MODEL_FILE, experience=i)
            if writer is not None:
                writer.log_step(i, metrics, info)
                if probe_suite is not None:
                    writer.log_probes(i, probe_suite.last_results, probe_suite.last_images)
            if not quiet:
                echo(format_step(metrics, i))
    except BaseException:
        if results.matrix:
            results.status = "failed"
            write_json_atomic(run_dir / "metrics.json", results.to_json())
        raise
    finally:
        if writer is not None:
            writer.close()
    if not quiet:
        echo("")
        echo(format_table(metrics))
    return metrics
