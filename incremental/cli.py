"""The ``incremental`` command line.

Start-up is kept lazy: torch, timm and Avalanche (6-9 s to import here) are only loaded
by the commands that need them. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from .cluster import LAUNCHERS
from .errors import ConfigError, UserError

LIST_KINDS = ("protocols", "datasets", "backbones", "strategies", "probes", "tuning", "codecs")


def _quiet_third_party_warnings() -> None:
    # qpsolvers warns at Avalanche's import that no QP solver is installed; only GEM-style
    # strategies need one, and they fail clearly when used without it.
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="incremental",
        description="Class-incremental learning with Vision Transformers (Avalanche + timm).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # every command takes --verbose, after its name as users write it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="after an error's one line, the underlying library's own message (torch's, say)")

    def add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
        p.add_argument("config", metavar="CONFIG", nargs="?" if optional else None,
                       help="a protocol name (see `incremental list protocols`) or a path to a YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config value (YAML syntax), e.g. --set training.epochs=5; repeatable")
        add_plugin_arg(p)

    def add_trust_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--trust-plugins", action="store_true",
                       help="import the plugin code a run folder's config.yaml lists (by default only the "
                       "plugins you name again with --plugin are imported from a run folder)")

    def add_plugin_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="PATH_OR_MODULE",
                       help="a .py file or module that registers your own strategies, backbones, probes or "
                       "datasets (imported first); repeatable")

    run = sub.add_parser("run", parents=[common], help="run a class-incremental protocol")
    add_config_args(run, optional=True)
    run.add_argument("--out", metavar="DIR", help="run directory (default: OUTPUT_ROOT/NAME-TIMESTAMP)")
    run.add_argument("--resume", metavar="DIR", help="continue a stopped run after its last complete experience "
                     "(its own config.yaml; a CONFIG given too must resolve to the same values)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no per-step lines, no table")
    add_trust_arg(run)

    mae = sub.add_parser("pretrain-mae", parents=[common], help="pretrain a ViT encoder by masked autoencoding; "
                         "saves encoder.safetensors for `pretrained:`")
    add_config_args(mae)
    mae.add_argument("--out", metavar="DIR", help="output directory (default: OUTPUT_ROOT/NAME-mae-TIMESTAMP)")
    mae.add_argument("--quiet", "-q", action="store_true", help="print nothing")

    probe = sub.add_parser("probe", parents=[common], help="run probes on a finished run's saved model "
                           "(writes RUN_DIR/probes.json and heat maps)")
    probe.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `incremental run`")
    probe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override the run's config, e.g. --set 'probes=[corruptions, {name: ood, "
                       "worst_case: true}]'; repeatable")
    probe.add_argument("--out", metavar="FILE", help="results file (default: RUN_DIR/probes.json)")
    probe.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    add_plugin_arg(probe)
    add_trust_arg(probe)

    sweep = sub.add_parser("sweep", parents=[common], help="run a config over seeds and value grids (complete runs are kept), "
                           "then compare them")
    add_config_args(sweep)
    sweep.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                       help="run seeds (default: the config's own seed)")
    sweep.add_argument("--out", metavar="DIR", help="sweep directory (default: OUTPUT_ROOT/NAME-sweep)")
    sweep.add_argument("--quiet", "-q", action="store_true", help="only the final table")
    sweep.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                       help="runs at a time, each in its own process (default 1: one after another, in this one)")
    sweep.add_argument("--gpus", metavar="IDS", default="",
                       help="with --jobs: comma-separated GPU ids, one per process in turn (CUDA_VISIBLE_DEVICES); "
                       "default: every process sees the GPUs this one does")
    cluster = sweep.add_argument_group("cluster", "each run as a job through submitit (pip install "
                                       "\"incremental-vit[slurm]\"); see incremental.cluster")
    cluster.add_argument("--launcher", choices=LAUNCHERS, default="local",
                         help="local: in this process or --jobs processes (default); slurm: one SLURM job array; "
                         "submitit-local: the same jobs as local processes (a dry run)")
    cluster.add_argument("--slurm-partition", metavar="NAME", default=None, help="the partition (default: the cluster's)")
    cluster.add_argument("--slurm-time", type=int, default=240, metavar="MIN", help="minutes per job (default 240)")
    cluster.add_argument("--gpus-per-run", type=int, default=1, metavar="N", help="GPUs per job (default 1)")
    cluster.add_argument("--cpus-per-run", type=int, default=8, metavar="N", help="CPU cores per job (default 8)")
    cluster.add_argument("--array-parallelism", type=int, default=256, metavar="N",
                         help="jobs of the array running at once (default 256)")
    cluster.add_argument("--no-wait", action="store_true", help="return once the jobs are submitted")
    sweep.epilog = "A --set with comma-separated values (--set strategy=replay,finetune) is a grid axis."

    cmp_ = sub.add_parser("compare", parents=[common], help="table of runs (mean ± std over seeds), report.md and plots")
    cmp_.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                      help="directories written by `incremental run`, or a folder of them (a sweep's --out); "
                      "folders without a run inside are skipped with a note")
    cmp_.add_argument("--group-by", action="append", default=[], metavar="KEY.PATH",
                      help="group runs by this config key (repeatable); default: runs that differ only in "
                      "their seed form one group")
    cmp_.add_argument("--out", metavar="DIR", default="comparison", help="where report.md and the plots go")

    check = sub.add_parser("check", parents=[common], help="validate a config and print it resolved; it also loads the data and "
                           "builds the model and strategy as a run would (~10 s, mostly Avalanche's import)")
    add_config_args(check)
    check.add_argument("--no-data", action="store_true",
                       help="check the file alone, in under a second: no data, model or strategy")

    lst = sub.add_parser("list", parents=[common], help="list protocols and registered components")
    lst.add_argument("kind", nargs="?", choices=LIST_KINDS, help="what to list (default: everything)")
    add_plugin_arg(lst)
    return parser


def _import_cli_plugins(args: argparse.Namespace) -> list[str]:
    """Import the ``--plugin`` files and modules (relative to the current folder)."""
    from .extensions import load_plugin

    from .registry import load_builtins

    load_builtins()  # first, so a plugin that reuses a built-in name is the one named in the error
    return [load_plugin(spec, Path.cwd(), key="--plugin") for spec in getattr(args, "plugins", [])]


def _resume_config(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """The config of the run in ``--resume DIR``; a CONFIG (and --set) given as well must
    resolve to the same values, or the resumed run would mix two protocols. The plugin code
    the run's config.yaml lists is imported only when named again or trusted."""
    from .config import config_differences, load_config
    from .run.directory import CONFIG_FILE, check_recorded_plugins

    if args.out:
        raise UserError("--resume continues the run in its own directory; drop --out", key="--out")
    run_dir = Path(args.resume).expanduser()
    saved_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory", key="--resume")
    if not saved_path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}; expected a directory written by `incremental run`",
                        key="--resume")
    named = _import_cli_plugins(args)
    requested = None
    if args.config is not None:  # the user's own file: its plugins are theirs to import
        requested = load_config(args.config, args.overrides, plugins=named)
        named = list(requested[0].plugins)
    check_recorded_plugins(run_dir, named, args.trust_plugins)
    saved = load_config(str(saved_path), plugins=named)[0]
    cfg, source = requested or load_config(str(saved_path), args.overrides, plugins=named)
    differences = config_differences(saved, cfg)
    if differences:
        key, was, now = differences[0]
        more = f" (and {len(differences) - 1} more key(s))" if len(differences) > 1 else ""
        raise source.attribute(ConfigError(
            f"is {now!r} but the run in {run_dir} was started with {was!r}{more}; a resumed run keeps its "
            f"config: use `incremental run --resume {run_dir}` alone", key=key))
    cfg.name = saved.name  # output settings may change on resume; the name stays the run's
    return cfg, source, run_dir


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .run import run

    if args.resume:
        cfg, source, run_dir = _resume_config(args)
    elif args.config is None:
        raise UserError("give a CONFIG to run, or --resume DIR to continue a stopped run", key="CONFIG")
    else:
        cfg, source = load_config(args.config, args.overrides, plugins=_import_cli_plugins(args))
        run_dir = _output_path(args.out, cfg, "")
    try:
        run(cfg, run_dir, quiet=args.quiet, resume=bool(args.resume), out_key="--out" if args.out or args.resume
            else "output.root")
    except UserError as exc:
        raise source.attribute(exc)
    return 0


def _output_path(out: str | None, cfg: Any, suffix: str) -> Path:
    """``--out``, or a timestamped folder under ``output.root``; a path that is not valid UTF-8
    is refused here, before anything is written (TensorBoard and JSON need text paths)."""
    from .run.directory import default_run_dir

    path = Path(out).expanduser() if out else default_run_dir(cfg, suffix)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{str(path).encode('utf-8', 'backslashreplace').decode()} is not a valid UTF-8 path",
                        key="--out" if out else "output.root") from None
    return path


def _cmd_pretrain_mae(args: argparse.Namespace) -> int:
    from .config import load_config
    from .config.schema import PretrainConfig
    from .mae import pretrain

    cfg, source = load_config(args.config, args.overrides, schema=PretrainConfig,
                              plugins=_import_cli_plugins(args))
    run_dir = _output_path(args.out, cfg, "-mae")
    try:
        pretrain(cfg, run_dir, quiet=args.quiet, out_key="--out" if args.out else "output.root")
    except UserError as exc:
        raise source.attribute(exc)
    except KeyboardInterrupt:
        log = run_dir / "mae_log.json"
        print(f"interrupted; the loss so far is in {log}" if log.exists() else "interrupted; nothing was kept",
              file=sys.stderr)
        return 130
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from .probes.offline import probe_run

    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory", key="RUN_DIR")
    probe_run(run_dir, args.overrides, Path(args.out).expanduser() if args.out else None, quiet=args.quiet,
              plugins=_import_cli_plugins(args), trust_plugins=args.trust_plugins)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .compare import compare
    from .sweep import sweep

    from .config.fields import SEED_MAX
    from .errors import RunsFailed
    from .run.directory import is_complete

    MAX_JOBS = 256

    out = Path(args.out).expanduser() if args.out else None
    for seed in args.seeds or ():
        if not 0 <= seed <= SEED_MAX:
            raise UserError(f"seeds are 0 to {SEED_MAX}, got {seed}", key="--seeds")
    if not 1 <= args.jobs <= MAX_JOBS:
        raise UserError(f"must be 1 to {MAX_JOBS}, got {args.jobs}", key="--jobs")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if any(not g.isdigit() for g in gpus) or (gpus and args.jobs == 1):
        raise UserError(f"expected comma-separated GPU ids with --jobs 2 or more, got {args.gpus!r}", key="--gpus")
    cluster = None
    if args.launcher != "local":
        from .cluster import JobOptions

        if args.jobs != 1 or gpus:
            raise UserError(f"--jobs and --gpus are for --launcher local; --launcher {args.launcher} gives each "
                            f"run its own job (--gpus-per-run)", key="--jobs" if args.jobs != 1 else "--gpus")
        cluster = JobOptions(args.launcher, args.slurm_partition, args.slurm_time, args.gpus_per_run,
                             args.cpus_per_run, args.array_parallelism, wait=not args.no_wait)
        cluster.check()
    echo = (lambda _: None) if args.quiet else print
    failure: RunsFailed | None = None
    try:
        run_dirs = sweep(args.config, args.seeds, args.overrides, out, quiet=args.quiet, echo=echo,
                         plugins=_import_cli_plugins(args), jobs=args.jobs, gpus=gpus, cluster=cluster)
    except RunsFailed as exc:  # the complete runs are still compared
        failure, run_dirs = exc, exc.run_dirs
    complete = [d for d in run_dirs if is_complete(d)]
    if complete:
        report_dir = complete[0].parent / "comparison"
        print(compare(complete, report_dir))
        print(f"\nwrote {report_dir / 'report.md'}")
    if failure is not None:
        raise failure
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    out = Path(args.out).expanduser()
    table = compare([Path(p).expanduser() for p in args.run_dirs], out, args.group_by)
    print(table)
    print(f"\nwrote {out / 'report.md'}")
    return 0


def _build_model_and_strategy(cfg: Any, splits: Any, split: Any) -> None:
    """What a run builds before its first step, on the CPU: a strategy that does not fit the
    backbone (prompts on a ResNet, prompt layers past its depth, class-name heads without a text
    tower) fails here as it would there."""
    from .models.net import build_model
    from .probes.ood import check_text_heads
    from .protocol import build_benchmark
    from .strategy import StrategyContext, build_strategy

    model = build_model(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size,
                        initial_classes=split.classes_per_experience[0])
    context = StrategyContext(config=cfg, class_split=split, benchmark=build_benchmark(splits, split), device="cpu",
                              splits=splits)
    build_strategy(context, model)
    check_text_heads(cfg.probes, model)


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import dump_yaml, load_config

    cfg, source = load_config(args.config, args.overrides, plugins=_import_cli_plugins(args))
    summary = ""
    from .run.environment import check_run_memory, resolve_device

    from .trackers import require_tracker_libraries

    try:  # what a run would refuse; torch is imported only for CUDA
        require_tracker_libraries(list(cfg.output.loggers))
        check_run_memory(cfg, resolve_device("cuda") if cfg.training.device == "cuda" else "cpu")
    except UserError as exc:
        raise source.attribute(exc)
    if not args.no_data:
        from .data import build_dataset
        from .protocol import make_class_split

        from .models.pretrained import check_pretrained_files

        try:
            check_pretrained_files(cfg.backbone)
            splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
            split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
            _build_model_and_strategy(cfg, splits, split)
            if cfg.probes:  # reads reference runs and OOD datasets, as a run would
                from .probes.base import ProbeData, build_probes

                build_probes(cfg.probes, ProbeData(splits, split.class_order, split.classes_per_experience, cfg.seed,
                                                   cfg.protocol.templates))
        except UserError as exc:
            raise source.attribute(exc)
        summary = (f"# {splits.num_classes} classes ({len(splits.train)} train / {len(splits.test)} test images), "
                   f"{split.num_experiences} experiences of {list(split.classes_per_experience)} classes\n")
    sys.stdout.write(f"# resolved from {source.path}\n{summary}{dump_yaml(cfg)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    _import_cli_plugins(args)
    kinds = [args.kind] if args.kind else list(LIST_KINDS)
    out = []
    for kind in kinds:
        out.append(f"{kind}:")
        if kind == "protocols":
            from .config import protocol_descriptions
            from .class_orders import NAMED_ORDER_NAMES

            descriptions = protocol_descriptions()
            width = max([28, *map(len, descriptions)])
            for name, description in descriptions.items():
                out.append(f"  {name:<{width}}  {description}")
            out.append(f"  (named class orders: {', '.join(NAMED_ORDER_NAMES)})")
        else:
            from .registry import REGISTRIES, format_options, load_builtins

            load_builtins(kind)
            registry = REGISTRIES[kind]
            if not len(registry):
                out.append("  (none yet)")
            width = max([14, *(len(entry.name) for entry in registry)])  # a long name keeps its gap
            for entry in registry:
                out.append(f"  {entry.name:<{width}}  {entry.summary}")
                options = format_options(entry.config_cls)
                if options:
                    out.append(f"  {'':<{width}}    options: {options}")
            if registry.common_options is not None:
                out.append(f"  (every entry also takes: {format_options(registry.common_options)})")
        out.append("")
    sys.stdout.write("\n".join(out))
    return 0


COMMANDS = {"run": _cmd_run, "pretrain-mae": _cmd_pretrain_mae, "probe": _cmd_probe, "sweep": _cmd_sweep,
            "compare": _cmd_compare,
            "check": _cmd_check, "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_third_party_warnings()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        if args.verbose and exc.detail:
            print(exc.detail.strip(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # outside a run (a run says what it kept itself)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group the run joined (torch warns otherwise)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
