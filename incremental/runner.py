"""Runs one class-incremental protocol: one SupervisedTemplate, the strategy as a plugin.

After every experience the model is evaluated on the test data of every experience seen so
far; the row of the accuracy matrix is added, every metric recomputed from the matrix, and
``metrics.json`` rewritten atomically, so a run that stops midway keeps what it finished.
"""

from __future__ import annotations

import json
import os
import shutil
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


def without_wall_clock(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json minus its wall-clock times (``wall_time_s``, ``total_wall_time_s`` and each
    probe result's ``time_s``): what two runs of one config and seed, or a resumed run and an
    uninterrupted one, have in common to the bit on the CPU."""
    kept = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "total_wall_time_s")}
    kept["probes"] = {label: [None if r is None else {k: v for k, v in r.items() if k != "time_s"} for r in results]
                      for label, results in metrics.get("probes", {}).items()}
    return kept


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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers (and a resumed run) never see a half-written file


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


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


def use_deterministic_algorithms(enabled: bool) -> None:
    """Deterministic kernels (process-wide), as torch's reproducibility notes ask."""
    import torch

    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled and torch.backends.cudnn.benchmark


def device_data_path(data_path: str, device: Any) -> bool:
    """Whether in-memory datasets go to the device (see TrainingConfig.data_path)."""
    return data_path == "device" or (data_path == "auto" and getattr(device, "type", str(device)) == "cuda")


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


RESUME_LOG = "resume.log"


def can_resume(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds a stopped run of ``cfg`` with a checkpoint to continue from."""
    import yaml

    from .checkpoint import CHECKPOINT_FILE
    from .config import config_differences, parse_dataclass

    try:
        saved = parse_dataclass(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, UserError):
        return False
    return (run_dir / CHECKPOINT_FILE).is_file() and not config_differences(saved, cfg)


def open_resume(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The checkpoint to resume ``run_dir`` from, checked against ``cfg``; None when the run
    stopped before its first experience was complete (it then starts again in place)."""
    import yaml

    from .checkpoint import CHECKPOINT_FILE, load_checkpoint
    from .config import config_differences, parse_dataclass

    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        metrics = run_dir / "metrics.json"
        done = 0
        if metrics.exists():
            try:
                done = int(json.loads(metrics.read_text()).get("completed_experiences", 0))
            except (ValueError, AttributeError, TypeError):
                done = 0
        if done:
            raise UserError(f"{run_dir} has results of {done} experience(s) but no {CHECKPOINT_FILE} "
                            f"(output.checkpoint was off); it cannot be resumed", key="--resume")
        return None
    checkpoint = load_checkpoint(path)
    try:
        # Parsed, so keys a later version adds take their defaults instead of differing.
        saved = parse_dataclass(RunConfig, yaml.safe_load(checkpoint["config"]))
    except (UserError, yaml.YAMLError) as exc:
        raise UserError(f"{path} holds a config this version cannot read ({exc})", key="--resume") from None
    differences = config_differences(saved, cfg)
    if differences:
        key, was, now = differences[0]
        raise ConfigError(f"is {now!r} but {path.name} was written with {was!r}; restore it or start a new run",
                          key=key, source=str(run_dir / "config.yaml"))
    return checkpoint


def restore_checkpoint(checkpoint: dict[str, Any], *, model: Any, plugins: list[Any], template: Any,
                       results: "RunResults", run_dir: Path) -> int:
    """Load a checkpoint into a freshly built run; returns the first experience still to train."""
    from .checkpoint import set_clock_state, set_rng_state
    from .models.net import grow_head

    states = checkpoint["plugins"]
    complete = int(checkpoint["experience"]) + 1 >= int(checkpoint["num_experiences"])
    if not complete and (len(states) != len(plugins) or any(state is None for state in states)):
        names = [type(p).__name__ for p, state in zip(plugins, states) if state is None] or ["a different plugin list"]
        raise ConfigError(f"this strategy keeps state that a checkpoint cannot hold ({', '.join(names)}); "
                          f"the run cannot be resumed, start it again", key="strategy.name")
    grow_head(model, int(checkpoint["num_classes"]))
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise UserError(f"{run_dir / 'checkpoint.pt'} does not fit the model of config.yaml: "
                        f"{lines[1].strip() if len(lines) > 1 else lines[0]}", key="backbone") from None
    for plugin, state in zip(plugins, states):
        if state is not None:
            plugin.load_state_dict(state, model)
    set_clock_state(template.clock, checkpoint["clock"])
    if checkpoint["grad_scaler"]:
        template.scaler.load_state_dict(checkpoint["grad_scaler"])
    saved = json.loads(checkpoint["results"])
    if not len(saved["matrix"]) == len(saved["steps"]) == int(checkpoint["experience"]) + 1:
        raise UserError(f"{run_dir / 'checkpoint.pt'} is inconsistent: experience {checkpoint['experience']} "
                        f"with {len(saved['matrix'])} rows of results", key="--resume")
    results.matrix, results.steps = saved["matrix"], saved["steps"]
    set_rng_state(checkpoint["rng"])  # last: building the run above drew random numbers
    return int(checkpoint["experience"]) + 1


def write_checkpoint(run_dir: Path, cfg: RunConfig, experience: int, *, template: Any, plugins: list[Any],
                     schedule: dict[str, Any], results: "RunResults") -> None:
    from .checkpoint import CHECKPOINT_FILE, clock_state, plugin_states, rng_state, save_checkpoint

    state = {
        "experience": experience,
        "num_experiences": len(results.experiences),
        "config": dump_yaml(cfg),
        "model": {k: v.detach().cpu() for k, v in template.model.state_dict().items()},
        "num_classes": int(template.model.num_classes),
        "optimizer": template.optimizer.state_dict(),
        "scheduler": schedule,
        "clock": clock_state(template.clock),
        "grad_scaler": template.scaler.state_dict(),  # fp16 loss scale, carried across experiences
        "plugins": plugin_states(plugins),
        "rng": rng_state(),
        "results": json.dumps({"matrix": results.matrix, "steps": results.steps}),
    }
    path = run_dir / CHECKPOINT_FILE
    save_checkpoint(state, path)
    if cfg.output.checkpoint == "all":
        archive = run_dir / "checkpoints"
        archive.mkdir(exist_ok=True)
        target = archive / f"experience_{experience:03d}.pt"
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)


def run(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, resume: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol of ``cfg`` into ``run_dir``; returns the final metrics.

    ``resume``: continue the run in ``run_dir`` after its last checkpointed experience; the
    final metrics.json equals an uninterrupted run's except for the wall-clock times.
    """
    from .distributed import broadcast_object, device_for, init_from_environment, on_rank_zero

    dist = init_from_environment(cfg.training.device)  # torchrun: join the process group
    run_dir = Path(broadcast_object(str(run_dir), dist))  # rank 0's (timestamped) directory
    main = dist.is_main  # only rank 0 prints and writes
    quiet = quiet or not main
    checkpoint = None
    if resume:
        checkpoint = open_resume(run_dir, cfg)
    else:
        def create() -> None:
            prepare_run_dir(run_dir)
            write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))

        on_rank_zero(create, dist)

    import torch
    from avalanche.training.determinism.rng_manager import RNGManager

    from .data import build_dataset
    from .models import build_model
    from .models.compress import compression_plugins
    from .metrics import old_predicted_as_new
    from .models.net import describe, describe_build, head_norm_ratio
    from .plugins import EvaluationRecorder, OptimizationPlugin, ProgressBars, silent_evaluator
    from .protocol import build_benchmark, make_class_split
    from .registry import STRATEGIES
    from .checkpoint import unresumable
    from .strategy import StrategyContext
    from .template import IncrementalTemplate
    from .summary import format_step, format_table

    RNGManager.set_random_seeds(cfg.seed)
    use_deterministic_algorithms(cfg.training.deterministic)
    device = device_for(dist, resolve_device(cfg.training.device))
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
    if cfg.probes and main:  # probes restore every RNG they touch, so ranks stay in step
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
    if cfg.training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    template = IncrementalTemplate(
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
        precision=cfg.training.precision,
        channels_last=cfg.training.channels_last,
        compile=cfg.training.compile,
        persistent_workers=cfg.training.persistent_workers,
        prefetch_factor=cfg.training.prefetch_factor,
        batch_augmentation=splits.batch_augmentation if device_data_path(cfg.training.data_path, device) else None,
        dist=dist,
    )

    test_sizes = [len(exp.dataset) for exp in benchmark.test_stream]
    results = RunResults(cfg, list(class_split.class_order), class_split.experiences, splits.class_names, test_sizes)
    results.backbone_report = model.build_report
    stateful = [*strategy_plugins, *compression]  # what a checkpoint holds besides the model
    first = 0
    if checkpoint is not None:
        first = restore_checkpoint(checkpoint, model=model, plugins=stateful, template=template,
                                   results=results, run_dir=run_dir)
    if first == class_split.num_experiences:  # complete: metrics.json is rewritten from the checkpoint
        results.status = "complete"
        metrics = results.to_json()
        if main:
            write_json_atomic(run_dir / "metrics.json", metrics)
        if not quiet:
            echo(f"{run_dir}: the run is complete ({first} experiences); nothing to resume")
        return metrics
    if resume and main:
        with open(run_dir / RESUME_LOG, "a") as log:
            log.write(f"{datetime.now().isoformat(timespec='seconds')} resumed at experience {first}\n")
    writer = None
    if cfg.output.tensorboard and main:
        from .tensorboard import TensorBoardWriter, run_hparams

        # A resumed run drops what the stopped one logged for the experiences it redoes.
        writer = TensorBoardWriter(run_dir, run_hparams(cfg), purge_step=first if resume else None)
    if not quiet:
        echo(f"run {cfg.name}: {cfg.dataset.name}, {class_split.num_experiences} experiences "
             f"{list(class_split.classes_per_experience)}, strategy {cfg.strategy.name}, "
             f"backbone {cfg.backbone.name} ({describe(model)}), device {device}")
        for line in describe_build(model.build_report):
            echo(line)
        echo(f"resuming {run_dir} at experience {first}" if resume else f"writing to {run_dir}")
        if cfg.output.checkpoint != "off" and unresumable(stateful):
            echo(f"note: strategy {cfg.strategy.name} keeps state a checkpoint cannot hold "
                 f"({', '.join(unresumable(stateful))}); this run cannot be resumed")

    metrics: dict[str, Any] = results.to_json() if results.matrix else {}
    try:
        for i in range(first, class_split.num_experiences):
            experience = benchmark.train_stream[i]
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
            if not main:
                continue
            write_json_atomic(run_dir / "metrics.json", metrics)
            if cfg.output.save_model:
                save_model(template.model, run_dir / MODEL_FILE, experience=i)
            if writer is not None:
                writer.log_step(i, metrics, info)
                if probe_suite is not None:
                    writer.log_probes(i, probe_suite.last_results, probe_suite.last_images)
            if cfg.output.checkpoint != "off":  # last: the experience is done once this is written
                write_checkpoint(run_dir, cfg, i, template=template, plugins=stateful,
                                 schedule=optimization.schedule_state(), results=results)
            if not quiet:
                echo(format_step(metrics, i))
    except BaseException:
        if results.matrix and main:
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
