"""How long the answers that need no training take: `incremental list`, `check --no-data` and a
one-line config error, each a fresh interpreter, against importing torch alone.

    python experiments/bench/bench_startup.py [--repeats 5]

Prints mean ± std of the wall time over the repeats. The target (issue 17) is under 2 s on a
2-core machine: none of these imports torch, timm or Avalanche.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "incremental list": [sys.executable, "-m", "incremental", "list"],
    "incremental check cifar100_b50_10steps --no-data": [sys.executable, "-m", "incremental", "check",
                                                         "cifar100_b50_10steps", "--no-data"],
    "a config typo (--set training.epoch=3)": [sys.executable, "-m", "incremental", "run", "digits_b0_5steps",
                                               "--set", "training.epoch=3"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'command':<52} {'seconds (mean ± std over ' + str(args.repeats) + ')':>30}")
    for label, command in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{label:<52} {statistics.mean(times):>14.2f} ± {statistics.stdev(times):.2f}")


if __name__ == "__main__":
    main()
