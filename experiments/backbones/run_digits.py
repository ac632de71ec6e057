"""One digits class-incremental run per backbone family (B0, 5 steps of 2 classes, herding
replay, 5 epochs per step: the default protocol with another backbone and a quarter of its epochs),
plus the ViT initialised by `incremental pretrain-mae` on the base classes and a pruned + int8 ViT.

Five epochs rather than the protocol's 20 so that three seeds of all ten backbones fit in about
40 minutes on a 2-core machine (at 20, one seed took an hour; at 10, 50 minutes on a machine also
running other jobs). The numbers compare the backbones at an equal, short budget: the slow
starters (S3, DeiT) are further from their converged accuracy than the small ViTs.

    python experiments/backbones/run_digits.py [--seeds 1993 1994 1995] [--jobs 2]
        [--out runs/backbones_digits] [--report-only]

Every run is the real `incremental` command in its own process with one thread; complete
runs are kept, so the script can be stopped and started again. Writes digits_results.md next
to itself and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import complete_runs, headline, is_complete, mean_std, run_all, run_incremental  # noqa: E402

CONFIGS = {  # file stem -> what it is
    "vit": "ViT (default protocol: patch 4, 128 wide, 4 blocks)",
    "vit_conv_stem": "ViT, conv stem (ViTIL)",
    "vit_mae": "ViT, MAE-pretrained on the base classes",
    "vit_compressed": "ViT, 50% pruned, int8 evaluation",
    "timm_vit": "timm DeiT-Ti, patch 8 (lr 5e-4, 2 warmup epochs)",
    "vit_dlcl": "ViT-DLCL, 8 blocks",
    "swin": "Swin, 48 wide, 3 stages",
    "s3_tiny": "S3-T, 16 px (lr 5e-4, 2 warmup epochs)",
    "resnet18": "ResNet-18, CIFAR stem (16 px)",
    "resnet32": "ResNet-32",
}


EPOCHS = 5  # per step; see the module docstring


def run_seed(seed: int, out: Path, jobs: int) -> None:
    overrides = [f"seed={seed}", f"protocol.order_seed={seed}"]
    run_overrides = [*overrides, f"training.epochs={EPOCHS}"]
    mae_dir = out / f"vit_mae_pretrain-seed{seed}"
    print(run_incremental("pretrain-mae", HERE / "digits" / "vit_mae_pretrain.yaml", mae_dir, *overrides,
                          marker="mae_log.json"), flush=True)
    runs = []
    for stem in CONFIGS:
        extra = [f"backbone.pretrained={mae_dir / 'encoder.safetensors'}"] if stem == "vit_mae" else []
        runs.append((HERE / "digits" / f"{stem}.yaml", out / f"{stem}-seed{seed}", *run_overrides, *extra))
    run_all(runs, jobs)


def report(out: Path, seeds: list[int], command: str) -> str:
    lines = ["# Digits, one run per backbone family", "", "Produced by", "", f"    {command}", "",
             f"B0, 5 steps of 2 classes, herding replay (200 exemplars), {EPOCHS} epochs per step: the default "
             "protocol with another backbone and a quarter of its epochs. Seeds " + str(seeds) + " (each sets the run seed and the class "
             "order); mean ± std over seeds. One CPU thread per run, two runs at a time on a 2-core machine.",
             "", "| backbone | entry | params (M) | avg inc acc | last acc | forgetting | wall s | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for stem, label in CONFIGS.items():
        runs = complete_runs(out, stem, seeds)
        if not runs:
            lines.append(f"| {label} | - | - | - | - | - | - | 0 |")
            continue
        params = runs[0].get("backbone_report", {}).get("params") or float("nan")
        row = headline(runs)
        lines.append(f"| {label} | `{runs[0]['backbone']}` | {params / 1e6:.2f} | {row['avg']} | {row['last']} | "
                     f"{row['forgetting']} | {row['wall']} | {row['runs']} |")
    logs = [json.loads((out / f"vit_mae_pretrain-seed{s}" / "mae_log.json").read_text()) for s in seeds
            if is_complete(out / f"vit_mae_pretrain-seed{s}", "mae_log.json")]
    if logs:
        first = mean_std([log["epoch_loss"][0] for log in logs])
        last = mean_std([log["epoch_loss"][-1] for log in logs])
        lines += ["", f"MAE pretraining ({len(logs[0]['epoch_loss'])} epochs on the {logs[0]['images']} training "
                  f"images of the 2 base classes, mask ratio 0.75): normalised-pixel loss {first} in epoch 1, "
                  f"{last} in the last epoch; "
                  f"{statistics.mean(log.get('wall_time_s', 0) for log in logs):.0f} s per seed."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/backbones_digits"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        for seed in args.seeds:
            run_seed(seed, args.out, args.jobs)
    command = "python experiments/backbones/run_digits.py " + " ".join(
        a for a in sys.argv[1:] if a != "--report-only")
    text = report(args.out, args.seeds, command.strip())
    (HERE / "digits_results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
