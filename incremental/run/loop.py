"""Runs one class-incremental protocol: build once, then for every experience train, evaluate,
probe and record.

One SupervisedTemplate carries the strategy's plugins. After every experience the model is
evaluated on the test data of every experience seen so far, the probes run, and the run
directory records the experience in its durable order (see :mod:`.directory`), so a run that
stops at any moment keeps every experience it finished and can be resumed.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import RunConfig, dump_yaml
from ..errors import Interrupted, Terminated, UserError
from .directory import ResumePlan, RunDirectory, plan_resume
from .environment import (check_run_memory, device_data_path, hide_avalanche_deprecations, resolve_device,
                          resolve_workers, torch_threads, use_deterministic_algorithms)
from .resume import checkpoint_state, restore_checkpoint
from .results import RunResults


@dataclass
class BuiltRun:
    """Everything one run trains and records with, made once by :func:`build`."""

    cfg: RunConfig
    dist: Any
    device: Any
    class_split: Any
    benchmark: Any
    model: Any
    template: Any
    optimization: Any
    recorder: Any
    probe_suite: Any
    stateful: list[Any]  # what a checkpoint holds besides the model: strategy and compression plugins
    results: RunResults


def build(cfg: RunConfig, dist: Any, *, quiet: bool, echo: Callable[[str], None]) -> BuiltRun:
    """Data, class split, benchmark, model, strategy plugins and the template, seeded by ``cfg.seed``."""
    import torch
    from avalanche.training.determinism.rng_manager import RNGManager

    from ..data import build_dataset
    from ..distributed import device_for
    from ..models.net import build_model, resolve_backbone_weights
    from ..models.compress import compression_plugins, evaluates_int8
    from ..training.plugins import EvaluationRecorder, OptimizationPlugin, ProgressBars, silent_evaluator
    from ..protocol import build_benchmark, make_class_split
    from ..strategy import StrategyContext, build_strategy
    from ..training.template import IncrementalTemplate

    RNGManager.set_random_seeds(cfg.seed)
    use_deterministic_algorithms(cfg.training.deterministic)
    device = device_for(dist, resolve_device(cfg.training.device))
    check_run_memory(cfg, device)  # before any data is loaded
    weights = resolve_backbone_weights(cfg.backbone)  # a name: its file, and the mean and std it wants
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config, weights.statistics() if weights else None)
    class_split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    benchmark = build_benchmark(splits, class_split)
    model = build_model(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size,
                        initial_classes=class_split.classes_per_experience[0], weights=weights)
    context = StrategyContext(config=cfg, class_split=class_split, benchmark=benchmark, device=device, splits=splits)
    compression, compression_hooks = compression_plugins(cfg.backbone, model, in_chans=splits.channels,
                                                         img_size=splits.image_size, device=device)
    context.param_group_hooks.extend(compression_hooks)
    probe_suite = None
    if cfg.probes and dist.is_main:  # probes restore every RNG they touch, so ranks stay in step
        from ..probes.base import ProbeData
        from ..probes.suite import ProbeSuite

        probe_data = ProbeData(splits, class_split.class_order, class_split.classes_per_experience, cfg.seed,
                               cfg.protocol.templates)
        probe_suite = ProbeSuite(cfg.probes, probe_data, class_split.num_experiences,
                                 echo=None if quiet else echo, int8=evaluates_int8(cfg.backbone))
    strategy_plugins = build_strategy(context, model)
    from ..probes.ood import check_text_heads

    check_text_heads(cfg.probes, model)
    from ..models.clip import has_text_tower

    if has_text_tower(model) and getattr(cfg.backbone.config, "head_init", None) == "text":
        from ..training.plugins import TextHeadInit

        # first: the strategy's own before_training_exp sees the rows set
        strategy_plugins = [TextHeadInit(context), *strategy_plugins]
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
        # The optimizer is built after the strategy's before_training_exp, over the parameters
        # it left trainable (EASE unfreezes the new experience's adapters there). Compression
        # plugins come after the strategy's: the int8 copy replaces the model for evaluation
        # once the strategy has finished its own before_eval work.
        plugins=[*strategy_plugins, optimization, *compression, recorder, ProgressBars(enabled=not quiet)],
        evaluator=silent_evaluator(),
        precision=cfg.training.precision,
        channels_last=cfg.training.channels_last,
        compile=cfg.training.compile,
        persistent_workers=cfg.training.persistent_workers,
        prefetch_factor=cfg.training.prefetch_factor,
        batch_augmentation=splits.batch_augmentation if device_data_path(cfg.training.data_path, device) else None,
        dist=dist,
        feature_cache_bytes=cfg.training.feature_cache_mb << 20,
    )
    test_sizes = [len(exp.dataset) for exp in benchmark.test_stream]
    results = RunResults(cfg, list(class_split.class_order), class_split.experiences, splits.class_names, test_sizes)
    results.backbone_report = model.build_report
    return BuiltRun(cfg, dist, device, class_split, benchmark, model, template, optimization, recorder,
                    probe_suite, [*strategy_plugins, *compression], results)


def train_experience(built: BuiltRun, i: int) -> float:
    """Train experience ``i`` (the strategy's own after-training work included); seconds taken,
    torch.compile's time excluded (it goes to the template's phase times as ``compile``)."""
    from ..training.engine import compile_seconds

    cfg = built.cfg
    compiled_before = compile_seconds()
    built.template.train_epochs = cfg.training.initial_epochs if (i == 0 and cfg.training.initial_epochs) \
        else cfg.training.epochs
    start = time.perf_counter()
    with warnings.catch_warnings():
        hide_avalanche_deprecations()
        built.template.train(built.benchmark.train_stream[i], eval_streams=[], reset_optimizer_state=True,
                             num_workers=resolve_workers(cfg.training.num_workers))
    compiling = compile_seconds() - compiled_before
    if compiling:
        built.template.phase_times.add("compile", compiling)
    return time.perf_counter() - start - compiling


def evaluate_experience(built: BuiltRun, i: int) -> float:
    """Evaluate on the test data of experiences 0..i (the recorder fills row i); seconds taken."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        hide_avalanche_deprecations()
        built.template.eval(built.benchmark.test_stream[: i + 1], num_workers=resolve_workers(built.cfg.training.num_workers))
    return time.perf_counter() - start


def probe_experience(built: BuiltRun, i: int) -> float:
    """The configured probes on the model after experience ``i`` (rank 0); seconds taken."""
    if built.probe_suite is None:
        return 0.0
    start = time.perf_counter()
    built.probe_suite.run(built.template.model, i, built.device)
    return time.perf_counter() - start


def step_record(built: BuiltRun, i: int, *, train_s: float, eval_s: float, probe_s: float) -> dict[str, Any]:
    """Experience ``i``'s row of metrics.json besides its accuracies."""
    from ..metrics import old_predicted_as_new
    from ..models.net import head_norm_ratio

    recorder = built.recorder
    predictions = recorder.prediction_matrix(i + 1)
    import torch

    return {"train_s": train_s, "eval_s": eval_s, "phase_s": built.template.phase_times.collect(),
            "torch_threads": torch.get_num_threads(),
            "train_loss": recorder.train_loss,
            "train_samples": recorder.train_samples, "train_loss_per_epoch": recorder.epoch_losses,
            "trained_params": recorder.trained_params,
            "prediction_matrix": predictions, "old_predicted_as_new": old_predicted_as_new(predictions),
            "task_il_accuracies": recorder.task_accuracies(i + 1),
            "head_norm_ratio": head_norm_ratio(built.template.model, built.class_split.label_ranges(), i),
            "probe_s": probe_s,
            "probes": built.probe_suite.last_results if built.probe_suite is not None else {},
            "memory": memory_report(built.stateful)}


def memory_images(plugins: list[Any]) -> dict[str, Any]:
    """Images a memory shows in TensorBoard (a generator's samples per class), HWC uint8."""
    for plugin in plugins:
        images = getattr(plugin, "memory_images", None)
        if callable(images):
            return images()
    return {}


def memory_report(plugins: list[Any]) -> dict[str, Any] | None:
    """What the strategy's memory holds after this experience (its plugins' ``memory_report``:
    bytes, exemplars, decoded quality), or None for a strategy without one."""
    for plugin in plugins:
        report = getattr(plugin, "memory_report", None)
        if callable(report):
            return report()
    return None


def record_experience(built: BuiltRun, directory: RunDirectory, writer: Any, i: int, info: dict[str, Any]) -> None:
    """Write experience ``i`` into the run directory (TensorBoard, checkpoint, model, metrics)."""
    cfg, suite = built.cfg, built.probe_suite
    metrics = built.results.to_json()

    def tensorboard() -> None:
        writer.log_step(i, metrics, info)
        writer.log_memory(i, info.get("memory"), memory_images(built.stateful))
        if suite is not None:
            writer.log_probes(i, suite.last_results, suite.last_images)

    def checkpoint() -> dict[str, Any]:
        return checkpoint_state(cfg, i, template=built.template, plugins=built.stateful,
                                schedule=built.optimization.schedule_state(), results=built.results)

    directory.record_experience(
        i, metrics, tensorboard=tensorboard if writer is not None else None,
        checkpoint=checkpoint if cfg.output.checkpoint != "off" else None, archive=cfg.output.checkpoint == "all",
        model=built.template.model if cfg.output.save_model else None)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's stop) ends the run like Ctrl-C: results kept, status ``stopped``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_directory(cfg: RunConfig, run_dir: Path, resume: bool, dist: Any,
                    out_key: str = "--out") -> tuple[RunDirectory | None, ResumePlan | None]:
    """Rank 0 creates or reopens the directory (taking its lock); every rank reads the resume plan."""
    from ..distributed import on_rank_zero

    holder: list[RunDirectory] = []

    def open_it() -> None:
        holder.append(RunDirectory.reopen(run_dir) if resume
                      else RunDirectory.create(run_dir, dump_yaml(cfg), key=out_key))

    on_rank_zero(open_it, dist)
    directory = holder[0] if holder else None
    try:
        plan = plan_resume(run_dir, cfg) if resume else None
        if directory is not None:
            directory.begin()
    except BaseException:
        if directory is not None:
            directory.close()
        raise
    return directory, plan


def run(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, resume: bool = False,
        echo: Callable[[str], None] = print, out_key: str = "--out") -> dict[str, Any]:
    """Run the protocol of ``cfg`` into ``run_dir``; returns the final metrics.

    ``resume``: continue the run in ``run_dir`` after its last checkpointed experience (or
    from experience 0 in place when none is complete); the final metrics.json equals an
    uninterrupted run's except for the wall-clock times. A failure ends in a UserError whose
    message says what was kept and how to continue, when a resume would work.
    """
    from ..distributed import broadcast_object, init_from_environment

    from ..trackers import require_tracker_libraries

    require_tracker_libraries(list(cfg.output.loggers))  # before anything is computed
    dist = init_from_environment(cfg.training.device)  # torchrun: join the process group
    run_dir = Path(broadcast_object(str(run_dir), dist))  # rank 0's (timestamped) directory
    quiet = quiet or not dist.is_main  # only rank 0 prints and writes
    directory, plan = _open_directory(cfg, run_dir, resume, dist, out_key)
    built: BuiltRun | None = None
    started = False  # once the resume has been restored, a failure leaves a resumable run
    from ..progress import shown

    try:
        with sigterm_as_interrupt(), shown(not quiet), torch_threads(cfg.training.threads):
            built = build(cfg, dist, quiet=quiet, echo=echo)
            first = 0
            if plan is not None and plan.checkpoint is not None:
                first = restore_checkpoint(plan.checkpoint, model=built.model, plugins=built.stateful,
                                           template=built.template, results=built.results, run_dir=run_dir)
            if directory is not None:
                from ..checkpoint import unresumable

                directory.num_experiences = built.class_split.num_experiences
                directory.checkpointing = cfg.output.checkpoint != "off"
                directory.unresumable = unresumable(built.stateful)
                from ..models.compress import evaluates_int8

                if evaluates_int8(cfg.backbone):  # model.safetensors says which network the run evaluated
                    directory.model_metadata["evaluated_as"] = "int8_dynamic"
                if plan is not None:
                    directory.log_resume(plan)
            started = True
            return _run_experiences(built, directory, first, resume=resume, quiet=quiet, echo=echo)
    except KeyboardInterrupt as exc:
        stop = Interrupted("stopped by SIGTERM", exit_code=143) if isinstance(exc, Terminated) \
            else Interrupted("interrupted")
        raise _stopped(built, directory, stop, started=started, status="stopped") from None
    except UserError as exc:
        raise _stopped(built, directory, exc, started=started, status="failed") from None
    except BaseException:
        _stopped(built, directory, None, started=started, status="failed")
        raise
    finally:
        if directory is not None:
            directory.close()


def _stopped(built: BuiltRun | None, directory: RunDirectory | None, exc: UserError | None, *,
             started: bool, status: str) -> Any:
    """Record a stopped or failed run and finish the error's message: what was kept, and how
    to continue when (and only when) a resume would work.

    A new run that ends before its first experience is complete removes what it wrote, so the
    same command works again once the cause is fixed. Otherwise metrics.json says ``status``
    with the experiences that are durable; a resume that fails before it restored anything
    leaves the run as it found it."""
    if directory is None:
        return exc
    interrupted = isinstance(exc, Interrupted)
    if directory.fresh and directory.completed == 0:
        directory.discard()
        if interrupted:
            exc.message += "; stopped before the first experience was complete, nothing was kept"
        return exc
    if started and built is not None and directory.completed:
        built.results.truncate(directory.completed)
        built.results.status = status
        directory.record_stop(built.results.to_json())
    else:
        directory.record_stop(None)
    if exc is None:
        return None
    if interrupted and directory.completed:
        exc.message += f"; {directory.completed} complete experience(s) kept in {directory.path}"
    if started or interrupted:
        exc.message += directory.resume_hint()
    return exc


def open_trackers(cfg: RunConfig, directory: RunDirectory | None) -> Any:
    """The run's CSV, W&B and MLflow trackers (incremental.trackers), on the process that writes."""
    from ..trackers import TRACKERS, Trackers

    if directory is None or not any(name in TRACKERS for name in cfg.output.loggers):
        return None
    from ..config import to_dict

    return Trackers(directory.path, to_dict(cfg), cfg.output)


def echo_run_header(built: BuiltRun, directory: RunDirectory | None, first: int, *, resume: bool,
                    echo: Callable[[str], None]) -> None:
    """The lines a run prints before its first experience: what runs, the weights, where it writes."""
    from ..models.net import describe, describe_build

    cfg, total = built.cfg, built.class_split.num_experiences
    echo(f"run {cfg.name}: {cfg.dataset.name}, {total} experiences (exp 0-{total - 1}) "
         f"{list(built.class_split.classes_per_experience)}, strategy {cfg.strategy.name}, "
         f"backbone {cfg.backbone.name} ({describe(built.model)}), device {built.device}")
    for line in describe_build(built.model.build_report):
        echo(line)
    where = directory.path if directory is not None else ""
    echo(f"resuming {where} at exp {first}" if resume else f"writing to {where}")
    if cfg.output.checkpoint != "off" and directory is not None and directory.unresumable:
        echo(f"note: strategy {cfg.strategy.name} keeps state a checkpoint cannot hold "
             f"({', '.join(directory.unresumable)}); this run cannot be resumed")


def _run_experiences(built: BuiltRun, directory: RunDirectory | None, first: int, *, resume: bool, quiet: bool,
                     echo: Callable[[str], None]) -> dict[str, Any]:
    from ..summary import format_step, format_table

    cfg, results = built.cfg, built.results
    total = built.class_split.num_experiences
    if first == total:  # complete: metrics.json (and the model) rewritten from the checkpoint
        results.status = "complete"
        metrics = results.to_json()
        if directory is not None:
            directory.completed = first
            directory.record_experience(first - 1, metrics,
                                        model=built.template.model if cfg.output.save_model else None)
        if not quiet:
            echo(f"{directory.path if directory else ''}: the run is complete ({first} experiences); nothing to resume")
        return metrics
    if first and directory is not None:
        # The checkpoint is the truth: a kill between it and metrics.json or the model file
        # left those behind; they are brought level before training goes on.
        directory.record_experience(first - 1, results.to_json(),
                                    model=built.template.model if cfg.output.save_model else None)
    writer = None
    if cfg.output.tensorboard and "tensorboard" in cfg.output.loggers and directory is not None:
        from ..tensorboard import TensorBoardWriter, run_hparams

        # A resumed run drops what the stopped one logged for the experiences it redoes.
        writer = TensorBoardWriter(directory.path, run_hparams(cfg), purge_step=first if resume else None)
    trackers = open_trackers(cfg, directory)
    if not quiet:
        echo_run_header(built, directory, first, resume=resume, echo=echo)
    metrics: dict[str, Any] = results.to_json() if results.matrix else {}
    status = "failed"
    try:
        if trackers is not None and results.matrix:  # a resume: what the stopped process had not sent
            trackers.log(metrics, results.steps)
        for i in range(first, total):
            train_s = train_experience(built, i)
            eval_s = evaluate_experience(built, i)
            probe_s = probe_experience(built, i)
            results.add(built.recorder.accuracies(i + 1),
                        step_record(built, i, train_s=train_s, eval_s=eval_s, probe_s=probe_s))
            if i == total - 1:
                results.status = "complete"
            metrics = results.to_json()
            if directory is None:
                continue
            record_experience(built, directory, writer, i, {**results.steps[-1]})
            if trackers is not None:
                trackers.log(metrics, results.steps)
            if not quiet:
                echo(format_step(metrics, i))
        status = "complete"
    except KeyboardInterrupt:
        status = "stopped"
        raise
    finally:
        if writer is not None:
            writer.close()
        if trackers is not None:
            trackers.finish(status)
    if not quiet:
        echo("")
        echo(format_table(metrics))
    return metrics
