"""Training throughput (images per second) of the toolkit against a plain PyTorch loop and
Avalanche's Naive strategy: the same model (same initial weights), data, transforms, batch
size, optimizer and epochs.

    python experiments/bench/bench_throughput.py                     # CPU, fp32
    python experiments/bench/bench_throughput.py --device cuda --precision bf16 --compile \\
        --peak-tflops 989                                            # a GPU (H100 dense bf16)

Contenders, each timed over the whole training of one experience of all 10 digit classes
(``--epochs`` epochs, the first included, as a user's run has it):

- ``plain``: a hand-written loop: DataLoader with the dataset's per-sample transforms,
  forward, cross-entropy, backward, AdamW step (autocast and torch.compile when asked);
- ``naive``: ``avalanche.training.Naive`` on the same Avalanche experience (fp32 only:
  Avalanche has no mixed precision);
- ``toolkit``: ``incremental.run.run`` with strategy ``finetune``, its training time
  (``wall_time_s[0].train``: dataset adaptation, optimizer, schedule, recorder included);
- ``toolkit+device``: the same with ``training.data_path: device`` (uint8 images on the device,
  augmented in batches).

Prints the median of ``--repeats`` runs per contender (run round robin) and the ratios toolkit / plain and
toolkit / naive (a ratio of 0.95 is 5% slower). With ``--peak-tflops`` also the model FLOPs
utilisation: 3 x forward FLOPs per image (forward + backward) x images/s / peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "vit": {"name": "vit", "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4, "global_pool": "avg",
            "drop_path_rate": 0.0},
    "resnet32": {"name": "resnet32"},
}


def base_config(model: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"name": "bench", "seed": 0, "dataset": {"name": "digits", "image_size": 32},
            "protocol": {"initial_classes": 10, "increment": 10, "class_order": "sorted"},
            "backbone": MODELS[model], "strategy": {"name": "finetune"},
            "training": {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device,
                         "precision": args.precision, "compile": args.compile, "channels_last": channels_last(model, args),
                         "optimizer": {"name": "adamw", "lr": 1e-3}, "scheduler": {"name": "constant"}},
            "output": {"tensorboard": False, "save_model": False, "checkpoint": "off"}}


def channels_last(model: str, args: argparse.Namespace) -> bool:
    """NHWC for the conv model on a GPU (on the CPU it is not faster, and Naive has no such option)."""
    return model == "resnet32" and args.device.startswith("cuda")


def setup(model_name: str, args: argparse.Namespace) -> tuple[Any, Any, Any, torch.device]:
    from avalanche.training.determinism.rng_manager import RNGManager

    from incremental.config import RunConfig, parse_dataclass
    from incremental.data import build_dataset
    from incremental.models.net import build_model
    from incremental.protocol import build_benchmark, make_class_split

    cfg = parse_dataclass(RunConfig, base_config(model_name, args))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    class_split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    RNGManager.set_random_seeds(cfg.seed)
    model = build_model(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size, initial_classes=10)
    return cfg, splits, build_benchmark(splits, class_split), model


def plain_loop(model_name: str, args: argparse.Namespace) -> float:
    from torch.utils.data import DataLoader

    from incremental.training.engine import autocast

    cfg, splits, benchmark, model = setup(model_name, args)
    device = torch.device(args.device)
    data = benchmark.train_stream[0].dataset.train()  # the same samples and per-sample transforms
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    model = model.to(device)
    nhwc = channels_last(model_name, args)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    criterion = torch.nn.CrossEntropyLoss()
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for _ in range(args.epochs):
        for x, y, *_ in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, args.precision):
                out = forward(x)
            loss = criterion(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def avalanche_naive(model_name: str, args: argparse.Namespace) -> float:
    from avalanche.training import Naive

    from incremental.training.plugins import silent_evaluator

    cfg, splits, benchmark, model = setup(model_name, args)
    device = torch.device(args.device)
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=args.batch_size,
                     train_epochs=args.epochs, device=device, evaluator=silent_evaluator())
    experience = benchmark.train_stream[0]
    synchronize(device)
    start = time.perf_counter()
    strategy.train(experience, eval_streams=[])
    synchronize(device)
    return len(experience.dataset) * args.epochs / (time.perf_counter() - start)


def toolkit(model_name: str, args: argparse.Namespace, data_path: str = "loader") -> float:
    from incremental.config import RunConfig, parse_dataclass
    from incremental.run import run

    raw = base_config(model_name, args)
    raw["training"]["data_path"] = data_path
    cfg = parse_dataclass(RunConfig, raw)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run(cfg, Path(tmp) / "run", quiet=True)
    return metrics["train_samples"][0] * args.epochs / metrics["wall_time_s"][0]["train"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops_per_image(model_name: str, args: argparse.Namespace) -> float:
    from incremental.models.compress import count_macs

    _, splits, _, model = setup(model_name, args)
    example = torch.zeros(2, splits.channels, splits.image_size, splits.image_size)
    return 2.0 * count_macs(model.backbone, example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for --precision, for MFU")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from incremental.registry import load_builtins

    load_builtins()
    contenders = {"plain": plain_loop, "naive": avalanche_naive, "toolkit": toolkit,
                  "toolkit+device": lambda m, a: toolkit(m, a, "device")}
    if args.precision != "fp32":
        del contenders["naive"]  # Avalanche has no mixed precision
    print(f"device {args.device}, precision {args.precision}, compile {args.compile}, batch {args.batch_size}, "
          f"{args.epochs} epochs, median of {args.repeats}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    header = f"{'model':<9} " + " ".join(f"{name:>15}" for name in contenders) + \
        f" {'toolkit/plain':>14} {'toolkit/naive':>14}" + (f" {'MFU toolkit':>12}" if args.peak_tflops else "")
    print(header)
    for model_name in args.models:
        runs: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):  # round robin: slow drifts of the machine hit every contender alike
            for name, measure in contenders.items():
                runs[name].append(measure(model_name, args))
        speeds = {name: statistics.median(values) for name, values in runs.items()}
        line = f"{model_name:<9} " + " ".join(f"{speeds[n]:>11.0f} i/s" for n in contenders)
        line += f" {speeds['toolkit'] / speeds['plain']:>14.3f}"
        line += f" {speeds['toolkit'] / speeds['naive']:>14.3f}" if "naive" in speeds else f" {'-':>14}"
        if args.peak_tflops:
            flops = 3 * forward_flops_per_image(model_name, args) * speeds["toolkit"]
            line += f" {100 * flops / (args.peak_tflops * 1e12):>11.1f}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
