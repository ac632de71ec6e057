"""One digits class-incremental run per backbone family (B0, 5 steps of 2 classes, herding
replay, 20 epochs per step: the default protocol with another backbone), plus the ViT
initialised by `incremental pretrain-mae` on the base classes and a pruned + int8 ViT.

    python experiments/backbones/run_digits.py [--seed 1993] [--jobs 2] [--out runs/backbones_digits]
        [--report-only]

Every run is the real `incremental` command in its own process with one thread; complete
runs are kept. Writes digits_results.md next to itself and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import run_incremental  # noqa: E402

CONFIGS = {  # file stem -> what it is
    "vit": "ViT (default protocol: patch 4, 128 wide, 4 blocks)",
    "vit_conv_stem": "ViT, conv stem (ViTIL)",
    "vit_mae": "ViT, MAE-pretrained on the base classes",
    "vit_compressed": "ViT, 50% pruned, int8 evaluation",
    "timm_vit": "timm DeiT-Ti, patch 8",
    "vit_dlcl": "ViT-DLCL, 8 blocks",
    "swin": "Swin, 48 wide, 3 stages",
    "s3_tiny": "S3-T (16 px)",
    "resnet18": "ResNet-18, CIFAR stem (16 px)",
    "resnet32": "ResNet-32",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/backbones_digits"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    seed = [f"seed={args.seed}", f"protocol.order_seed={args.seed}"]
    mae_dir = args.out / f"vit_mae_pretrain-seed{args.seed}"
    if not args.report_only:
        print(run_incremental("pretrain-mae", HERE / "digits" / "vit_mae_pretrain.yaml", mae_dir, *seed,
                              marker="mae_log.json"), flush=True)
        jobs = []
        for stem in CONFIGS:
            extra = [f"backbone.pretrained={mae_dir / 'encoder.safetensors'}"] if stem == "vit_mae" else []
            jobs.append((HERE / "digits" / f"{stem}.yaml", args.out / f"{stem}-seed{args.seed}", *seed, *extra))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for message in pool.map(lambda job: run_incremental("run", *job), jobs):
                print(message, flush=True)

    lines = [f"# Digits, one run per backbone family (seed {args.seed})", "",
             f"`python experiments/backbones/run_digits.py --seed {args.seed} --jobs {args.jobs}`; "
             "B0, 5 steps of 2 classes, herding replay (200 exemplars), 20 epochs per step, one CPU thread per run.",
             "", "| backbone | entry | params (M) | avg inc acc | last acc | forgetting | train + eval s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for stem, label in CONFIGS.items():
        path = args.out / f"{stem}-seed{args.seed}" / "metrics.json"
        if not path.is_file():
            lines.append(f"| {label} | | | not run | | | |")
            continue
        m = json.loads(path.read_text())
        params = m.get("backbone_report", {}).get("params")
        lines.append(f"| {label} | `{m['backbone']}` | {params / 1e6 if params else float('nan'):.2f} | "
                     f"{m['average_incremental_accuracy']:.2f} | {m['last_accuracy']:.2f} | "
                     f"{m['forgetting']['mean']:.2f} | "
                     f"{m['total_wall_time_s']:.0f} |")
    mae_log = mae_dir / "mae_log.json"
    if mae_log.is_file():
        log = json.loads(mae_log.read_text())
        losses = log["epoch_loss"]
        lines += ["", f"MAE pretraining ({len(losses)} epochs on {log['images']} images of the base classes): "
                  f"loss {losses[0]:.3f} (epoch 1) -> {losses[-1]:.3f} (epoch {len(losses)}), "
                  f"{log.get('wall_time_s', 0):.0f} s."]
    text = "\n".join(lines)
    (HERE / "digits_results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
