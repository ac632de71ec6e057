"""Cluster sweeps through submitit (incremental.cluster), run by submitit's local executor, which
starts each job as its own process with the job folder, pickled job, logs and requeueing that
SLURM jobs get: what differs on a cluster is only sbatch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN

from incremental.cli import main

JOB_FLAGS = ["--launcher", "submitit-local", "--cpus-per-run", "1", "--gpus-per-run", "0"]


def write_config(tmp_path: Path, body: str = "") -> str:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN + "output: {tensorboard: false}\n" + body)
    return str(config)


def test_a_sweep_runs_each_run_as_a_submitit_job_and_keeps_complete_ones(tmp_path, capsys) -> None:
    config = write_config(tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", config, "--seeds", "3", "4", "--out", str(out), "--set", "training.epochs=1",
            "--set", "strategy=simplecil", *JOB_FLAGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    run_dirs = sorted(out.glob("seed*"))
    assert [d.name for d in run_dirs] == ["seed3", "seed4"]
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "complete" and f"done {run_dir}" in printed
        assert "output:\n" in (run_dir / "config.yaml").read_text() and "group: sweep" in \
            (run_dir / "config.yaml").read_text()  # the trackers group the sweep's runs by its name
    assert len(list((out / "jobs").glob("*_log.err"))) == 2  # submitit's own files, a log per job
    assert main(argv) == 0  # started again: both complete, nothing submitted
    again = capsys.readouterr().out
    assert "submitted" not in again and again.count("kept") == 2


def job_processes(controller: int) -> list[int]:
    """The processes submitit's local controller started: the job's tasks (what SLURM signals)."""
    children = Path(f"/proc/{controller}/task/{controller}/children")
    return [int(pid) for pid in children.read_text().split()] if children.is_file() else []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the job's process through /proc")
def test_a_preempted_job_is_requeued_as_a_resume_of_its_run(tmp_path) -> None:
    """SIGUSR2 to the job's task, as SLURM signals a job it preempts, once the run has a complete
    experience: submitit calls RunJob.checkpoint and requeues the job, which continues the run
    from its checkpoint to the end."""
    import os
    import signal

    from incremental.cluster import JobOptions, RunJob, executor_for, run_argv

    config = write_config(tmp_path)
    run_dir = tmp_path / "sweep" / "run"
    executor = executor_for(tmp_path / "sweep", JobOptions("submitit-local", cpus_per_run=1, gpus_per_run=0), 1)
    job = executor.submit(RunJob(), run_argv(config, run_dir, ["training.epochs=4"], False, ()))
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint.pt").is_file() and time.monotonic() < deadline:
        assert not job.done(), job.stderr()
        time.sleep(0.1)
    (task,) = job_processes(job._process.pid)
    os.kill(task, signal.SIGUSR2)
    result = job.result()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete" and result["last_accuracy"] == metrics["last_accuracy"]
    assert "this job is preempted" in job.stderr() and "Requeued job" in job.stdout()
    assert "resumed at experience" in (run_dir / "resume.log").read_text()  # from its checkpoint, not anew


def test_the_checkpoint_hook_resumes_a_run_that_exists_and_restarts_one_that_does_not(tmp_path) -> None:
    from incremental.cluster import RunJob

    run_dir = tmp_path / "run"
    fresh = ["run", "c.yaml", "--out", str(run_dir), "--set", "seed=1", "--quiet", "--plugin", "p.py"]
    assert RunJob().checkpoint(fresh).args[0] == fresh
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    assert RunJob().checkpoint(fresh).args[0] == ["run", "--resume", str(run_dir), "--quiet", "--plugin", "p.py"]


@pytest.mark.parametrize("flags, expected", [
    (["--gpus-per-run", "-1"], "--gpus-per-run: must be 0 to 64, got -1"),
    (["--slurm-time", "0"], "--slurm-time: must be 1 to 43200, got 0"),
    (["--jobs", "2"], "--jobs: --jobs and --gpus are for --launcher local"),
    (["--slurm-partition", " "], "--slurm-partition: an empty partition name"),
    (["--array-parallelism", "0"], "--array-parallelism: must be 1 to 100000, got 0"),
])
def test_cluster_flags_out_of_range_are_one_line(tmp_path, capsys, flags, expected) -> None:
    code = main(["sweep", write_config(tmp_path), "--out", str(tmp_path / "s"), *JOB_FLAGS, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
