"""Runs one class-incremental protocol: one SupervisedTemplate, the strategy as a plugin.

After every experience the model is evaluated on the test data of every experience seen so
far; the row of the accuracy matrix is added, every metric recomputed from the matrix, and
``metrics.json`` rewritten atomically, so a run that stops midway keeps what it finished.
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig, dump_yaml
from .directory import MODEL_FILE, RESUME_LOG, prepare_run_dir, save_model, write_json_atomic, write_text_atomic
from .environment import device_data_path, hide_avalanche_deprecations, resolve_device, use_deterministic_algorithms
from .resume import open_resume, restore_checkpoint, write_checkpoint
from .results import RunResults


def run(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, resume: bool = False,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the protocol of ``cfg`` into ``run_dir``; returns the final metrics.

    ``resume``: continue the run in ``run_dir`` after its last checkpointed experience; the
    final metrics.json equals an uninterrupted run's except for the wall-clock times.
    """
    from ..distributed import broadcast_object, device_for, init_from_environment, on_rank_zero

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

    from ..data import build_dataset
    from ..models import build_model
    from ..models.compress import compression_plugins
    from ..metrics import old_predicted_as_new
    from ..models.net import describe, describe_build, head_norm_ratio
    from ..plugins import EvaluationRecorder, OptimizationPlugin, ProgressBars, silent_evaluator
    from ..protocol import build_benchmark, make_class_split
    from ..registry import STRATEGIES
    from ..checkpoint import unresumable
    from ..strategy import StrategyContext
    from ..template import IncrementalTemplate
    from ..summary import format_step, format_table

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
        from ..probes.base import ProbeData
        from ..probes.suite import ProbeSuite

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
        from ..tensorboard import TensorBoardWriter, run_hparams

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
