"""Wall time of a whole ViTIL protocol, broken down by phase, and its effective training rate
against the single-experience rate of the same model.

    python experiments/bench/bench_protocol.py --epochs 5          # a GPU: B0 10 steps, CIFAR-100 shape
    python experiments/bench/bench_protocol.py --tiny              # the CPU smoke mode CI runs

The protocol is ``experiments/vitil/cifar100_b0_10steps_vitil.yaml`` (DyTox's CIFAR ViT with
the conv stem, herding memory of 2,000, logit KD, balanced finetuning, the default probes) on
the ``synthetic`` dataset shaped like CIFAR-100 (500 train and 100 test images per class),
``--epochs`` per step, bf16 and ``data_path: device`` on a GPU. Phases, from metrics.json's
``wall_time_s`` summed over the steps:

- ``sgd``: the training loop's own work (``train`` minus the phases inside it below);
- ``kd_teacher``: the old model's forward passes for distillation;
- ``balanced_finetuning`` and ``exemplar_selection`` (herding's feature pass);
- ``compile``, ``evaluation``, ``probes``;
- ``other``: the rest of the command's wall time (model and data set-up, checkpoints,
  metrics.json, TensorBoard).

Effective rate: the images of the main training loop (new data plus replayed exemplars, times
epochs) per second of ``train`` (its after-training work included) and per second of the
whole run. Single-experience rate: the same model, batch and precision trained with
``finetune`` on one experience of 5,000 images for the same epochs.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "experiments" / "vitil" / "cifar100_b0_10steps_vitil.yaml"
INNER_PHASES = ("kd_teacher", "balanced_finetuning", "exemplar_selection")


def overrides(args: argparse.Namespace) -> list[str]:
    sets = [f"dataset={{name: synthetic, num_classes: {args.classes}, train_per_class: {args.train_per_class}, "
            f"test_per_class: {args.test_per_class}, augment: true}}",
            f"training.epochs={args.epochs}", f"training.device={args.device}", "training.data_path=device",
            "training.num_workers=0", f"training.scheduler.warmup_epochs={min(5, args.epochs - 1)}"]
    if args.device.startswith("cuda"):
        sets.append("training.precision=bf16")
    if args.tiny:
        sets += ["protocol.class_order=sorted", "protocol.increment=2", "protocol.memory.total=20",
                 "backbone={name: vit, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, stem: conv}",
                 "strategy.balanced_finetuning.epochs=1", "training.batch_size=16"]
    return sets


def timed_run(sets: list[str]) -> tuple[dict[str, Any], float]:
    from incremental.config import load_config
    from incremental.run import run

    cfg = load_config(str(PROTOCOL), sets)[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = run(cfg, Path(tmp) / "run", quiet=True)
        return metrics, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: 10 classes in 5 steps, a 1-block ViT")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.classes, args.train_per_class, args.test_per_class = 1, 10, 10, 5
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore")
    from incremental.registry import load_builtins

    load_builtins()
    importlib.import_module("avalanche.training")  # its slow first import is the command's, not the protocol's
    sets = overrides(args)
    metrics, wall = timed_run(sets)
    steps = metrics["wall_time_s"]
    total = {key: sum(step.get(key, 0.0) for step in steps) for key in ("train", "eval", "probes", "compile",
                                                                        *INNER_PHASES)}
    phases = {"sgd": total["train"] - sum(total[p] for p in INNER_PHASES),
              **{p: total[p] for p in INNER_PHASES}, "compile": total["compile"], "evaluation": total["eval"],
              "probes": total["probes"]}
    phases["other"] = wall - sum(phases.values())
    images = sum(metrics["train_samples"]) * args.epochs

    increment = args.classes // 10 if not args.tiny else 2
    single_sets = sets + ["strategy=finetune", f"protocol.initial_classes={increment}",
                          f"protocol.increment={increment}", "protocol.memory={}", "probes=[]",
                          f"dataset.num_classes={increment}", "protocol.class_order=sorted"]
    single, _ = timed_run(single_sets)
    single_rate = single["train_samples"][0] * args.epochs / single["wall_time_s"][0]["train"]
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{hardware}; torch {torch.__version__}; {PROTOCOL.name} on synthetic {args.classes} classes x "
          f"{args.train_per_class}, {len(steps)} steps, {args.epochs} epochs per step")
    print(f"{'phase':<20} {'seconds':>8} {'share':>6}")
    for name, seconds in phases.items():
        print(f"{name:<20} {seconds:>8.3f} {100 * seconds / wall:>5.1f}%")
    print(f"{'total':<20} {wall:>8.1f}")
    print(f"main-loop images {images}; effective rate {images / total['train']:.0f} i/s per training second, "
          f"{images / wall:.0f} i/s per run second; single-experience rate {single_rate:.0f} i/s; "
          f"ratio {images / total['train'] / single_rate:.2f} (training), {images / wall / single_rate:.2f} (run)")


if __name__ == "__main__":
    main()
