"""``incremental sweep CONFIG --seeds 0 1 2 [--set key=v1,v2 ...]``: a config over seeds and
value grids, one run directory per combination, runs already complete skipped and stopped ones
resumed from their checkpoints.

A ``--set`` whose value lists several values separated by top-level commas
(``strategy=replay,finetune``; commas inside ``[...]`` or ``{...}`` do not split) is a grid
axis; the runs are the product of every axis and the seeds. All the combinations are
validated before the first run starts, and every existing run directory checked: one is
reused only when its resolved config equals the requested one, and none is ever deleted. Run
directories are named after the axis values and the seed, under ``--out`` (default:
``OUTPUT_ROOT/NAME-sweep``).

With ``--jobs N`` the runs go N at a time, each in its own ``incremental run`` process (a
failure stays in its run; the others go on), with ``cpu_count / N`` threads each; ``--gpus 0,1``
gives each process one of those GPUs through ``CUDA_VISIBLE_DEVICES`` (without it they share
the visible ones: small models fill a large GPU poorly one at a time). Each process's output
goes to ``SWEEP/logs/RUN.log``; the sweep prints one line per run as it starts and ends.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError


def split_values(text: str) -> list[str]:
    """``a,b`` -> [a, b]; commas inside brackets, braces or quotes stay."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [p.strip() for p in parts]


def grid(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Fixed overrides, and (key, values) axes for those listing several values."""
    fixed, axes = [], []
    for override in overrides:
        if "=" not in override:
            raise UserError(f"expected KEY.PATH=VALUE[,VALUE...], got {override!r}", key="--set")
        key, value = override.split("=", 1)
        values = split_values(value)
        if len(values) > 1:
            axes.append((key.strip(), values))
        else:
            fixed.append(override)
    return fixed, axes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_")[:40] or "x"


def plan(config: str, seeds: Sequence[int] | None, overrides: Sequence[str], out: Path | None,
         plugins: Sequence[str] = ()) -> tuple[Path, list[tuple[Path, Any, Any, list[str]]]]:
    """The sweep root and (run directory, config, source, its --set overrides) of every run,
    all validated. ``seeds`` None: the config's own seed (with the fixed --set values applied)."""
    from .config import load_config

    fixed, axes = grid(overrides)
    if seeds is None:
        seeds = [load_config(config, fixed, plugins=plugins)[0].seed]
    runs = []
    root = out
    for values in itertools.product(*(v for _, v in axes)) if axes else [()]:
        for seed in seeds:
            sets = [*fixed, *(f"{key}={value}" for (key, _), value in zip(axes, values)), f"seed={seed}"]
            cfg, source = load_config(config, sets, plugins=plugins)
            if root is None:
                root = Path(cfg.output.root) / f"{cfg.name}-sweep"
            if cfg.output.group is None:  # the trackers group the sweep's runs under its name
                cfg.output.group = root.name
                sets.append(f"output.group={json.dumps(root.name)}")
            parts = [_slug(f"{key.rsplit('.', 1)[-1]}={value}") for (key, _), value in zip(axes, values)]
            runs.append((root / "-".join([*parts, f"seed{seed}"]), cfg, source, sets))
    if root is None:
        raise UserError("no seeds given", key="--seeds")
    return root, runs


def sweep(config: str, seeds: Sequence[int] | None, overrides: Sequence[str] = (), out: Path | None = None, *,
          quiet: bool = False, echo: Callable[[str], None] = print, plugins: Sequence[str] = (),
          jobs: int = 1, gpus: Sequence[str] = (), cluster: Any = None) -> list[Path]:
    """Run every combination not yet complete; returns the run directories in order.

    An existing directory is reused only when its resolved config equals the one asked for:
    kept when complete, resumed when stopped or failed. Any other directory (another config,
    one in use, files that are not a run) is refused before the first run starts, and no
    directory is ever deleted. ``cluster``: :class:`~incremental.cluster.JobOptions` to submit
    each run as a job instead (incremental.cluster)."""
    from .errors import Interrupted, RunsFailed
    from .run import run
    from .run.directory import reuse_decision

    root, runs = plan(config, seeds, overrides, out, plugins)
    decisions = [reuse_decision(run_dir, cfg) for run_dir, cfg, _, _ in runs]
    echo(f"sweep: {len(runs)} runs under {root}" + (f", {jobs} at a time" if jobs > 1 else ""))
    refused = [(run_dir, reason) for (run_dir, *_), (kind, reason) in zip(runs, decisions) if kind == "refused"]
    for index, ((run_dir, *_), (kind, reason)) in enumerate(zip(runs, decisions), 1):
        if kind != "new":
            echo(f"[{index}/{len(runs)}] {kind} {run_dir} ({reason})")
    if refused:
        first, reason = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UserError(f"{first} {reason}{more}; the sweep touches no directory it cannot reuse: remove it or "
                        f"choose another --out", key="--out")
    todo = [(index, run_dir, sets, kind == "resume") for index, ((run_dir, _, _, sets), (kind, _))
            in enumerate(zip(runs, decisions), 1) if kind != "kept"]
    if todo:
        from .trackers import prepare_group

        prepare_group(runs[0][1])  # before runs start side by side: one MLflow parent for them all
    if cluster is not None and todo:
        from .cluster import submit_runs

        failed = submit_runs(config, root, todo, len(runs), cluster, plugins=plugins, echo=echo)
        if failed:
            raise RunsFailed(f"{len(failed)} of {len(todo)} runs failed ({', '.join(p.name for p in failed)}); "
                             f"their job logs are in {root / 'jobs'}; the others are complete",
                             run_dirs=[run_dir for run_dir, *_ in runs])
        return [run_dir for run_dir, *_ in runs]
    if jobs > 1:
        try:
            _run_in_processes(config, root, todo, len(runs), jobs=jobs, gpus=gpus, plugins=plugins, echo=echo)
        except RunsFailed as exc:
            exc.run_dirs = [run_dir for run_dir, *_ in runs]
            raise
        return [run_dir for run_dir, *_ in runs]
    for index, run_dir, sets, resume in todo:
        _, cfg, source, _ = runs[index - 1]
        echo(f"[{index}/{len(runs)}] {'resuming' if resume else 'running'} {run_dir}")
        try:  # in this process: the run's bars and per-experience lines show its progress
            metrics = run(cfg, run_dir, quiet=quiet, resume=resume, echo=lambda line: echo(f"    {line}"))
        except Interrupted as exc:
            raise Interrupted(f"{exc.message.split(';')[0]}; complete runs are kept, and the stopped one resumes "
                              f"when the sweep is started again", exit_code=exc.exit_code) from None
        except UserError as exc:
            raise source.attribute(exc)
        if not quiet:
            echo(f"    average incremental accuracy {metrics['average_incremental_accuracy']:.2f}, "
                 f"last {metrics['last_accuracy']:.2f}")
    return [run_dir for run_dir, *_ in runs]


def _run_in_processes(config: str, root: Path, todo: list[tuple[int, Path, list[str], bool]], total: int, *,
                      jobs: int, gpus: Sequence[str], plugins: Sequence[str], echo: Callable[[str], None]) -> None:
    """``todo``'s runs, ``jobs`` processes at a time; one line per run as it starts and ends.
    A run that fails is reported and the others go on; at the end, one error lists them."""
    import json

    from .errors import Interrupted, RunsFailed

    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    pending, running, failed = list(todo), [], []
    plugin_args = [arg for spec in plugins for arg in ("--plugin", spec)]
    try:
        while pending or running:
            while pending and len(running) < jobs:
                index, run_dir, sets, resume = pending.pop(0)
                slot = next(k for k in range(jobs) if k not in {r[4] for r in running})
                env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                where = ["--resume", str(run_dir)] if resume else [config, "--out", str(run_dir)]
                sets_args = [] if resume else [arg for value in sets for arg in ("--set", value)]
                log = (logs / f"{run_dir.name}.log").open("w")
                process = subprocess.Popen([sys.executable, "-m", "incremental", "run", *where, *sets_args, "--quiet",
                                            *plugin_args], stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((process, index, run_dir, log, slot, time.monotonic()))
                device = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
                echo(f"[{index}/{total}] {'resuming' if resume else 'running'} {run_dir}{device}")
            time.sleep(0.2)
            for entry in [r for r in running if r[0].poll() is not None]:
                process, index, run_dir, log, _, began = entry
                running.remove(entry)
                log.close()
                seconds = time.monotonic() - began
                if process.returncode == 0:
                    metrics = json.loads((run_dir / "metrics.json").read_text())
                    echo(f"[{index}/{total}] done {run_dir}: average incremental accuracy "
                         f"{metrics['average_incremental_accuracy']:.2f}, last {metrics['last_accuracy']:.2f} "
                         f"({seconds:.0f} s)")
                else:
                    lines = (logs / f"{run_dir.name}.log").read_text(errors="replace").strip().splitlines()
                    failed.append(run_dir)
                    echo(f"[{index}/{total}] FAILED {run_dir} (exit {process.returncode}): "
                         f"{lines[-1] if lines else 'no output'} (log: {logs / (run_dir.name + '.log')})")
    except KeyboardInterrupt:
        for process, *_ in running:  # each run stops as after Ctrl-C: results kept, resumable
            process.terminate()
        for process, *_ in running:
            process.wait()
        raise Interrupted("interrupted; complete runs are kept, and the stopped ones resume when the sweep is "
                          "started again") from None
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(todo)} runs failed ({', '.join(p.name for p in failed)}); their "
                         f"logs are in {logs}; the others are complete")
