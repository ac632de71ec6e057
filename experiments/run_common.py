"""What the experiment scripts share: run `incremental` in a subprocess with one thread, and
let the run-directory module decide about existing runs (so a script can be stopped and started
again): a complete run of the same config is kept, a stopped one resumed, anything else refused
and never deleted."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

from incremental.compare import format_mean_std as mean_std
from incremental.run.directory import is_complete

__all__ = ["complete_runs", "experiment_args", "is_complete", "kept_reading", "mean_std", "run_incremental",
           "headline", "run_all", "run_seeds_then_report", "write_results"]


def run_incremental(command: str, config: Path, path: Path, *overrides: str, marker: str = "metrics.json") -> str:
    """``incremental COMMAND CONFIG --quiet --out PATH --set ...``, or ``--resume PATH`` for a
    stopped run of the same config; a line saying what was done."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # parallel runs must not oversubscribe
    sets = [arg for override in overrides for arg in ("--set", override)]
    if command == "run":
        from incremental.config import load_config
        from incremental.run.directory import reuse_decision

        kind, reason = reuse_decision(path, load_config(str(config), overrides)[0])
        if kind in ("kept", "refused"):
            return f"{kind.upper() if kind == 'refused' else kind} {path}{': ' + reason if kind == 'refused' else ''}"
        args = [sys.executable, "-m", "incremental", "run", str(config), *sets, "--quiet"]
        args += ["--resume", str(path)] if kind == "resume" else ["--out", str(path)]
    else:
        if is_complete(path, marker):
            return f"kept {path}"
        args = [sys.executable, "-m", "incremental", command, str(config), "--quiet", "--out", str(path), *sets]
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode:
        return f"FAILED {path}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
    return f"{'resumed' if '--resume' in args else 'done'} {path}"


def kept_reading(results: Path) -> str:
    """The hand-written "## Reading" section of an existing results file, kept on rewrite."""
    old = results.read_text() if results.is_file() else ""
    return "\n" + old[old.index("\n## Reading"):].rstrip("\n") if "\n## Reading" in old else ""


def experiment_args(description: str, default_out: str) -> argparse.Namespace:
    """The options every seeded experiment script takes: --seeds, --jobs, --out, --report-only."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args()


def write_results(folder: Path, script: str, title: str, body: str, name: str = "results.md") -> str:
    """``folder/name``: the title, the command that produced it (without --report-only), ``body``,
    and the existing file's hand-written reading, kept."""
    command = f"python {script} " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    results = folder / name
    text = "\n".join([f"# {title}", "", "Produced by", "", f"    {command.strip()}", "", body]) + kept_reading(results)
    results.write_text(text + "\n")
    return text


def complete_runs(out: Path, stem: str, seeds: list[int]) -> list[dict]:
    """The metrics.json of each complete run ``OUT/STEM-seedSEED``, in seed order."""
    import json

    return [json.loads((out / f"{stem}-seed{s}" / "metrics.json").read_text())
            for s in seeds if is_complete(out / f"{stem}-seed{s}")]


def run_seeds_then_report(doc: str, default_out: str, folder: Path, script: str, title: str,
                          run_seed: Callable[[int, Path, int], None], report: Callable[[Path, list[int]], str]) -> int:
    """A seeded experiment's main: parse the common options, run every seed (unless
    --report-only), then write and print results.md."""
    args = experiment_args(doc.splitlines()[0], default_out)
    if not args.report_only:
        for seed in args.seeds:
            run_seed(seed, args.out, args.jobs)
    print(write_results(folder, script, title, report(args.out, args.seeds)))
    return 0


def run_all(runs: Iterable[tuple], jobs: int) -> None:
    """``incremental run`` for each ``(config, path, *overrides)``, ``jobs`` at a time (one thread
    each), printing the line each returns as it finishes."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for message in pool.map(lambda job: run_incremental("run", *job), runs):
            print(message, flush=True)


def headline(runs: list[dict]) -> dict[str, str]:
    """The figures every results table shows for a set of seeds' runs: average incremental
    accuracy, last accuracy and forgetting (mean ± std), mean wall time, and the run count."""
    import statistics

    return {"avg": mean_std([m["average_incremental_accuracy"] for m in runs]),
            "last": mean_std([m["last_accuracy"] for m in runs]),
            "forgetting": mean_std([m["forgetting"]["mean"] for m in runs]),
            "wall": f"{statistics.mean(m['total_wall_time_s'] for m in runs):.0f}", "runs": str(len(runs))}
