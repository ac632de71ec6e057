"""Cluster sweeps: each run of ``incremental sweep`` submitted as one job through submitit.

``--launcher slurm`` submits the runs as one SLURM job array (``--slurm-partition``,
``--slurm-time`` minutes, ``--gpus-per-run``, ``--cpus-per-run``, ``--array-parallelism``);
``--launcher submitit-local`` starts the same jobs as local processes through submitit's local
executor, with the same job folder, logs and requeueing: a dry run of a cluster sweep on one
machine. Job files and logs go to ``SWEEP/jobs``.

A job runs ``incremental run`` in its run directory, with its lock, checkpoints and resume. A job
that SLURM preempts or times out is requeued by submitit as ``incremental run --resume``, which
continues from the last complete experience; starting the same sweep command again keeps the
complete runs, resumes the stopped ones and submits only those. By default the command waits and
reports each run as it ends; ``--no-wait`` returns once the jobs are submitted.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError

LAUNCHERS = ("local", "slurm", "submitit-local")
# --flag: (attribute, least, most)
LIMITS = {"--slurm-time": ("time_min", 1, 60 * 24 * 30), "--gpus-per-run": ("gpus_per_run", 0, 64),
          "--cpus-per-run": ("cpus_per_run", 1, 512), "--array-parallelism": ("array_parallelism", 1, 100_000)}


@dataclass
class JobOptions:
    """How each run is submitted (the sweep command's cluster flags)."""

    launcher: str = "slurm"
    partition: str | None = None
    time_min: int = 240
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    array_parallelism: int = 256
    wait: bool = True

    def check(self) -> None:
        """Each flag in its range, and submitit installed: one line naming the flag otherwise."""
        for flag, (attribute, least, most) in LIMITS.items():
            value = getattr(self, attribute)
            if not least <= value <= most:
                raise UserError(f"must be {least} to {most}, got {value}", key=flag)
        if self.partition is not None and not self.partition.strip():
            raise UserError("an empty partition name", key="--slurm-partition")
        if importlib.util.find_spec("submitit") is None:
            raise UserError(f"--launcher {self.launcher} submits jobs through submitit, which is not installed: "
                            f"pip install \"incremental-vit[slurm]\"", key="--launcher")


def run_argv(config: str, run_dir: Path, sets: Sequence[str], resume: bool, plugins: Sequence[str]) -> list[str]:
    """The ``incremental`` command line of one run of the sweep."""
    plugin_args = [arg for spec in plugins for arg in ("--plugin", spec)]
    if resume:
        return ["run", "--resume", str(run_dir), "--quiet", *plugin_args]
    return ["run", config, "--out", str(run_dir), *(a for value in sets for a in ("--set", value)), "--quiet",
            *plugin_args]


class RunJob:
    """What a job executes: ``incremental run`` with ``argv``, in the job's process. Picklable
    (submitit sends it to the node); ``checkpoint`` is submitit's hook on preemption and timeout."""

    def __call__(self, argv: list[str]) -> dict[str, Any]:
        import json

        from .cli import main

        code = main(argv)
        if code:
            raise RuntimeError(f"incremental {' '.join(argv)} exited with status {code}")
        run_dir = Path(argv[argv.index("--resume" if "--resume" in argv else "--out") + 1])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return {key: metrics[key] for key in ("average_incremental_accuracy", "last_accuracy")}

    def checkpoint(self, argv: list[str]) -> Any:
        """Requeued as a resume of the same run directory (a fresh one if it holds no run yet)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(), resume_argv(argv))


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` as it continues a run: ``--resume DIR`` once the directory holds a run."""
    if "--resume" in argv:
        return list(argv)
    run_dir = Path(argv[argv.index("--out") + 1])
    plugins = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--plugin"]
    return run_argv("", run_dir, (), True, plugins) if (run_dir / "config.yaml").is_file() else list(argv)


def executor_for(root: Path, options: JobOptions, jobs: int) -> Any:
    """submitit's executor for ``options``: SLURM, or its local one, with the job's resources."""
    import submitit

    executor = submitit.AutoExecutor(folder=root / "jobs",
                                     cluster="slurm" if options.launcher == "slurm" else "local")
    parameters: dict[str, Any] = {"name": root.name, "timeout_min": options.time_min,
                                  "gpus_per_node": options.gpus_per_run, "cpus_per_task": options.cpus_per_run,
                                  "tasks_per_node": 1, "nodes": 1}
    if options.launcher == "slurm":
        parameters["slurm_array_parallelism"] = min(options.array_parallelism, jobs)
        if options.partition:
            parameters["slurm_partition"] = options.partition
    executor.update_parameters(**parameters)
    return executor


def submit_runs(config: str, root: Path, todo: list[tuple[int, Path, list[str], bool]], total: int,
                options: JobOptions, *, plugins: Sequence[str], echo: Callable[[str], None]) -> list[Path]:
    """``todo``'s runs as one job array; with ``options.wait``, each reported as it ends.
    Returns the run directories whose jobs failed."""
    executor = executor_for(root, options, len(todo))
    try:
        with executor.batch():
            jobs = [executor.submit(RunJob(), run_argv(config, run_dir, sets, resume, plugins))
                    for _, run_dir, sets, resume in todo]
    except Exception as exc:  # sbatch missing or refusing (a partition, a limit): submitit's own errors
        reason = str(exc).strip().splitlines() or [type(exc).__name__]
        raise UserError(f"the jobs could not be submitted: {reason[-1][:300]}", key="--launcher") from None
    for (index, run_dir, _, resume), job in zip(todo, jobs):
        echo(f"[{index}/{total}] submitted {'resume of ' if resume else ''}{run_dir} as job {job.job_id}")
    if not options.wait:
        echo(f"jobs submitted; their logs are in {root / 'jobs'}; start the same sweep again to collect them")
        return []
    return wait_for(jobs, todo, total, root, echo)


def wait_for(jobs: list[Any], todo: list[tuple[int, Path, list[str], bool]], total: int, root: Path,
             echo: Callable[[str], None]) -> list[Path]:
    """Each job's end as it comes: its accuracies, or its error and log; the failed run directories."""
    pending, failed = list(zip(todo, jobs)), []
    while pending:
        for entry in [e for e in pending if e[1].done()]:
            pending.remove(entry)
            (index, run_dir, _, _), job = entry
            try:
                result = job.result()
                echo(f"[{index}/{total}] done {run_dir}: average incremental accuracy "
                     f"{result['average_incremental_accuracy']:.2f}, last {result['last_accuracy']:.2f} "
                     f"(job {job.job_id})")
            except Exception as exc:  # the job's own error, as submitit re-raises it
                failed.append(run_dir)
                lines = [line for line in str(exc).strip().splitlines() if line.strip()] or ["no output"]
                echo(f"[{index}/{total}] FAILED {run_dir} (job {job.job_id}): {lines[-1][:300]} "
                     f"(log: {job.paths.stderr})")
        if pending:
            time.sleep(0.5)
    return failed
