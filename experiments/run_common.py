"""What the experiment scripts share: run `incremental` in a subprocess with one thread, skip
runs whose metrics.json says complete and resume stopped ones from their checkpoints (so a
script can be stopped and started again)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from incremental.compare import format_mean_std as mean_std
from incremental.sweep import is_complete

__all__ = ["is_complete", "kept_reading", "mean_std", "run_incremental"]


def run_incremental(command: str, config: Path, path: Path, *overrides: str, marker: str = "metrics.json") -> str:
    """``incremental COMMAND CONFIG --quiet --out PATH --set ...``, unless already complete."""
    if is_complete(path, marker):
        return f"kept {path}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # parallel runs must not oversubscribe
    sets = [arg for override in overrides for arg in ("--set", override)]
    if command == "run" and (path / "checkpoint.pt").is_file():
        # the CLI refuses (exit 2) when the config changed since: then start again below
        args = [sys.executable, "-m", "incremental", "run", str(config), *sets, "--quiet", "--resume", str(path)]
        if subprocess.run(args, env=env, capture_output=True, text=True).returncode == 0:
            return f"resumed {path}"
    if path.exists():  # an unfinished earlier attempt that cannot be resumed: start it again
        shutil.rmtree(path)
    args = [sys.executable, "-m", "incremental", command, str(config), "--quiet", "--out", str(path), *sets]
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode:
        return f"FAILED {path}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
    return f"done {path}"


def kept_reading(results: Path) -> str:
    """The hand-written "## Reading" section of an existing results file, kept on rewrite."""
    old = results.read_text() if results.is_file() else ""
    return old[old.index("\n## Reading"):] if "\n## Reading" in old else ""
