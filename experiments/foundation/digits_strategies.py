"""Run the default digits protocol with each built-in strategy and print a summary table.

    python experiments/foundation/digits_strategies.py [--out runs/foundation] [--set KEY=VALUE ...]

Each run goes through the real `incremental run` command; the table is read back from
each run's metrics.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("finetune", "replay")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/foundation")
    parser.add_argument("--protocol", default="digits_b0_5steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    for strategy in STRATEGIES:
        run_dir = Path(args.out) / f"{args.protocol}-{strategy}"
        if not (run_dir / "metrics.json").exists():
            command = [sys.executable, "-m", "incremental", "run", args.protocol, "--quiet", "--out", str(run_dir),
                       "--set", f"strategy={strategy}"]
            for override in args.overrides:
                command += ["--set", override]
            subprocess.run(command, check=True)
        m = json.loads((run_dir / "metrics.json").read_text())
        rows.append((strategy, m["average_incremental_accuracy"], m["last_accuracy"], m["forgetting"]["mean"],
                     m["bwt"]["final"], m["total_wall_time_s"]))
    print(f"{args.protocol} (accuracies in %)")
    print(f"{'strategy':<10} {'avg inc':>8} {'last':>7} {'forget':>7} {'bwt':>8} {'time s':>7}")
    for name, avg, last, forget, bwt, seconds in rows:
        print(f"{name:<10} {avg:8.2f} {last:7.2f} {forget:7.2f} {bwt:8.2f} {seconds:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
