"""ViTIL ablation: from ViT finetuning to ViTIL one ingredient at a time, plus a ResNet with
replay, over several seeds, on digits (B0, 5 steps) and synthetic 100-class B50 (5 steps).

    python experiments/vitil_ablation/run_ablation.py [--seeds 1993 1994 1995] [--jobs 2]
        [--datasets digits synthetic] [--out runs/vitil_ablation] [--report-only]

Every run goes through the real `incremental run` command (one process per run, one thread
each, `--jobs` at a time); a finished run (metrics.json with status complete) is not run
again. A seed sets both the run seed and the class order (protocol.order_seed). The script
writes results.md next to itself from the runs' metrics.json files: mean and standard
deviation over seeds of the accuracies and forgetting, and ViTIL's three diagnostics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import is_complete, kept_reading, mean_std, run_incremental  # noqa: E402
VARIANTS = {
    "1_vit_finetune": "ViT, finetune",
    "2_vit_replay": "+ herding replay",
    "3_convstem_replay": "+ conv stem",
    "4_convstem_headlr": "+ head LR x10",
    "5_convstem_headlr_bft": "+ balanced finetuning",
    "6_vitil": "+ logit KD (= ViTIL)",
    "7_resnet32_replay": "ResNet-32, replay",
}
DATASETS = {"digits": "digits, B0, 5 steps of 2 classes", "synthetic": "synthetic 100 classes, B50, 5 steps of 10"}
CONVERGENCE_EPOCHS = (1, 3)  # the first step's mean loss over epoch 1 and epoch 3


def run_dir(out: Path, dataset: str, variant: str, seed: int) -> Path:
    return out / dataset / f"{variant}-seed{seed}"


def run_one(config: Path, path: Path, seed: int) -> str:
    return run_incremental("run", config, path, f"seed={seed}", f"protocol.order_seed={seed}")


def first_batch_size(path: Path) -> int:
    import yaml

    return int(yaml.safe_load((path / "config.yaml").read_text())["training"]["batch_size"])


def mean_over_steps(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def report(out: Path, seeds: list[int], datasets: list[str], command: str) -> str:
    lines = ["# ViTIL ablation", "",
             "Produced by", "", f"    {command}", "",
             f"Seeds {seeds} (each sets the run seed and the class order); mean ± standard deviation over seeds. "
             "Accuracies in %. Definitions are those of `incremental/metrics.py` (also in every metrics.json):",
             "",
             "- *avg inc*: average incremental accuracy (mean over steps of the accuracy on all seen classes, "
             "first step included); *last*: accuracy after the last step; *forgetting*: max-based (PyCIL/FACIL), "
             "after the last step.",
             "- *loss e1 / e3* (convergence): the first step's mean training loss over epoch 1 and over epoch 3 "
             "(k = iterations in brackets).",
             "- *old→new* (bias): % of old-class test images predicted as a class of the newest experience, "
             "mean over steps 2..T.",
             "- *‖W_new‖/‖W_old‖* (bias): mean L2 norm of the classifier rows of the newest classes over the "
             "old classes', mean over steps 2..T.",
             "- *time*: wall-clock seconds per run (one CPU thread, two runs at a time on a 2-core machine).", ""]
    for dataset in datasets:
        lines += [f"## {DATASETS[dataset]}", "",
                  "| variant | avg inc | last | forgetting | loss e1 / e3 (k) | old→new | ‖W_new‖/‖W_old‖ | time s | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for variant, label in VARIANTS.items():
            runs = [json.loads((run_dir(out, dataset, variant, s) / "metrics.json").read_text())
                    for s in seeds if is_complete(run_dir(out, dataset, variant, s))]
            if not runs:
                lines.append(f"| {label} | - | - | - | - | - | - | - | 0 |")
                continue
            losses = [[m["train_loss_per_epoch"][0][e - 1] for m in runs] for e in CONVERGENCE_EPOCHS]
            done = [s for s in seeds if is_complete(run_dir(out, dataset, variant, s))]
            batch = first_batch_size(run_dir(out, dataset, variant, done[0]))
            k = [e * -(-runs[0]["train_samples"][0] // batch) for e in CONVERGENCE_EPOCHS]
            loss_text = " / ".join(f"{statistics.mean(l):.2f}" for l in losses)
            loss_text += f" ({k[0]} / {k[1]})"
            lines.append(
                f"| {label} | {mean_std([m['average_incremental_accuracy'] for m in runs])} "
                f"| {mean_std([m['last_accuracy'] for m in runs])} "
                f"| {mean_std([m['forgetting']['mean'] for m in runs])} "
                f"| {loss_text} "
                f"| {mean_std([mean_over_steps(m['old_predicted_as_new']) for m in runs])} "
                f"| {mean_std([mean_over_steps(m['head_norm_ratio']) for m in runs])} "
                f"| {statistics.mean(m['total_wall_time_s'] for m in runs):.0f} | {len(runs)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/vitil_ablation"))
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        jobs = [(HERE / dataset / f"{variant}.yaml", run_dir(args.out, dataset, variant, seed), seed)
                for seed in args.seeds for dataset in args.datasets for variant in args.variants]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for message in pool.map(lambda job: run_one(*job), jobs):
                print(message, flush=True)
    # the command that runs (or resumes) the whole ablation: --report-only only re-reads it
    command = "python experiments/vitil_ablation/run_ablation.py " + " ".join(
        a for a in sys.argv[1:] if a != "--report-only")
    text = report(args.out, args.seeds, args.datasets, command.strip())
    args.results.write_text(text + "\n" + kept_reading(args.results))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
