"""What the experiment scripts share: run `incremental` in a subprocess with one thread, and
let the run-directory module decide about existing runs (so a script can be stopped and started
again): a complete run of the same config is kept, a stopped one resumed, anything else refused
and never deleted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from incremental.compare import format_mean_std as mean_std
from incremental.run.directory import is_complete

__all__ = ["is_complete", "kept_reading", "mean_std", "run_incremental"]


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
    return old[old.index("\n## Reading"):] if "\n## Reading" in old else ""
