"""The default digits protocol with the two reference strategies, finetune and replay, per seed.

    python experiments/foundation/digits_strategies.py [--seeds 1993 1994 1995] [--jobs 2]
        [--out runs/foundation] [--report-only]

Each run is the real `incremental run digits_b0_5steps` in its own process with one thread
(each seed sets the run seed and the class order); complete runs are kept, so the script can
be stopped and started again. Writes results.md next to itself and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import complete_runs, headline, mean_std, run_all, run_seeds_then_report  # noqa: E402

PROTOCOL = "digits_b0_5steps"
STRATEGIES = {"finetune": "finetune", "replay": "replay (herding, 200)"}


def run_seed(seed: int, out: Path, jobs: int) -> None:
    overrides = [f"seed={seed}", f"protocol.order_seed={seed}"]
    run_all([(Path(PROTOCOL), out / f"{strategy}-seed{seed}", *overrides, f"strategy={strategy}")
             for strategy in STRATEGIES], jobs)


def report(out: Path, seeds: list[int]) -> str:
    lines = [f"Protocol `{PROTOCOL}`: scikit-learn digits upsampled to 32 px, B0, 5 experiences of 2 classes; "
             "ViT patch 4, embed 128, depth 4, 4 heads, avg pool (0.80M parameters); AdamW 1e-3, cosine, "
             f"20 epochs, batch 32; replay memory 200 in total. Seeds {seeds} (each sets the run seed and the "
             "class order); mean ± std over seeds. One CPU thread per run, on a 2-core machine.", "",
             "| strategy | avg incremental acc | last acc | forgetting (max-based) | BWT | wall s | runs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for strategy, label in STRATEGIES.items():
        runs = complete_runs(out, strategy, seeds)
        if not runs:
            lines.append(f"| {label} | - | - | - | - | - | 0 |")
            continue
        row = headline(runs)
        bwt = mean_std([m["bwt"]["final"] for m in runs])
        lines.append(f"| {label} | {row['avg']} | {row['last']} | {row['forgetting']} | {bwt} | {row['wall']} | "
                     f"{row['runs']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_seeds_then_report(__doc__, "runs/foundation", HERE, "experiments/foundation/digits_strategies.py",
                                   "Foundation results: digits_b0_5steps", run_seed, report))
