"""Imbalanced class-incremental learning on digits: replay against gradient reweighting (DGR),
with balanced and long-tailed training data.

    python experiments/imbalanced/run_digits.py [--seeds 1993 1994 1995] [--jobs 1]
        [--out runs/imbalanced_digits] [--report-only]

Per seed: the MAE encoder of experiments/pretrained/run_digits.py (the base classes' training
images of that seed's class order), then replay and `grad_reweight` (both with 200 herding
exemplars, 5 epochs a step) on the balanced protocol (`digits_b0_5steps`) and on its shuffled
long tail (`digits_lt_shuffled_b0_5steps`: imbalance ratio 0.1, about 180 down to 18 training
images a class, the counts drawn over the classes from the order seed). The test sets are the
same balanced ones. What it measures: how much each method loses to the imbalance, and whether
DGR's logit adjustment and gradient reweighting recover it. Writes results.md next to itself
(keeping its "## Reading" section) and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import complete_runs, headline, mean_std, run_all, run_incremental, run_seeds_then_report  # noqa: E402

MAE_CONFIG = HERE.parent / "backbones" / "digits" / "vit_mae_pretrain.yaml"
PROTOCOLS = {"balanced": "digits_b0_5steps", "long_tail": "digits_lt_shuffled_b0_5steps"}
METHODS = {"replay": ("replay (herding)", "strategy={name: replay, selection: herding}"),
           "grad_reweight": ("gradient reweighting (DGR)", "strategy=grad_reweight")}


def run_seed(seed: int, out: Path, jobs: int) -> None:
    overrides = [f"seed={seed}", f"protocol.order_seed={seed}", "output.tensorboard=false"]
    mae_dir = out / f"mae-seed{seed}"
    print(run_incremental("pretrain-mae", MAE_CONFIG, mae_dir, *overrides, marker="mae_log.json"), flush=True)
    encoder = f"backbone.pretrained={mae_dir / 'encoder.safetensors'}"
    run_all([(protocol, out / f"{data}-{name}-seed{seed}", *overrides, "training.epochs=5", encoder, strategy)
             for data, protocol in PROTOCOLS.items() for name, (_, strategy) in METHODS.items()], jobs)


TITLE = "Imbalanced class-incremental learning on digits: replay and gradient reweighting"


def report(out: Path, seeds: list[int]) -> str:
    lines = ["Digits, B0, 5 steps of 2 classes, from the seed's MAE encoder (as experiments/pretrained/run_digits.py), "
             "200 herding exemplars, 5 epochs a step, AdamW 1e-3 (the protocol's training). Long tail: "
             "`digits_lt_shuffled_b0_5steps` (imbalance ratio 0.1, shuffled over the classes); the test sets are "
             f"balanced in both. Seeds {seeds} (each sets the run seed and the class order); mean ± std over seeds.", "",
             "| training data | method | avg inc acc | last acc | last task-IL acc | forgetting | images trained on (first seed, with exemplars) | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for data in PROTOCOLS:
        for name, (label, _) in METHODS.items():
            runs = complete_runs(out, f"{data}-{name}", seeds)
            if not runs:
                lines.append(f"| {data} | {label} | - | - | - | - | - | 0 |")
                continue
            h = headline(runs)
            task_il = mean_std([m["task_il_accuracy"][-1] for m in runs])
            images = sum(runs[0]["train_samples"])  # the first seed's, exemplars included
            lines.append(f"| {data} | {label} | {h['avg']} | {h['last']} | {task_il} | {h['forgetting']} | {images} | "
                         f"{h['runs']} |")
    return "\n".join(lines)


def main() -> int:
    return run_seeds_then_report(__doc__, "runs/imbalanced_digits", HERE, "experiments/imbalanced/run_digits.py", TITLE,
                                 run_seed, report)


if __name__ == "__main__":
    sys.exit(main())
