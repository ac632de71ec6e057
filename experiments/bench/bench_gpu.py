"""The toolkit's training throughput against a hand-written GPU-resident loop, per batch size
and precision, with the model FLOPs utilisation.

    python experiments/bench/bench_gpu.py --peak-tflops 790            # a GPU (H200: ~790 bf16)
    python experiments/bench/bench_gpu.py --tiny                       # the CPU smoke mode CI runs

Workload (issue 20): DyTox's CIFAR ViT (embed 384, depth 6, 12 heads, patch 4, 32 px) on the
``synthetic`` dataset shaped like CIFAR-100 (100 classes, ``--train-per-class`` images each,
random crop with padding 4 and flip), one experience of all classes, AdamW (fused on CUDA),
constant LR.

Contenders, with the same model and initial weights, images, augmentation and optimizer:

- ``loop``: a hand-written loop with the uint8 images on the device, a random permutation per
  epoch, the crop and flip batched on the device, autocast, fused AdamW: the speed a careful
  user gets without a framework;
- ``toolkit``: ``incremental.run.run`` with strategy ``finetune`` and ``data_path: device``; its
  training time (``wall_time_s[0].train``: dataset resolution, optimizer, schedule, the NaN
  check and loss record, all included; compilation excluded).

Both rates are training images per second over all ``--epochs`` epochs (the first included, as
in a user's run), with torch.compile's time left out of both (reported apart). Modes: ``fp32``,
``bf16`` (autocast) and ``bf16+compile`` (``training.compile: true``; the loop compiles its
model the same way), ``bf16+cudagraphs`` (``compile: reduce-overhead``). MFU = training FLOPs per
image (forward + backward, counted by torch's FlopCounterMode) x images/s / ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True),
         "bf16+cudagraphs": ("bf16", "reduce-overhead")}
CIFAR_VIT = {"name": "vit", "patch_size": 4, "embed_dim": 384, "depth": 6, "num_heads": 12, "drop_path_rate": 0.0}
TINY_VIT = {"name": "vit", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.0}


def run_config(args: argparse.Namespace, batch: int, mode: str) -> dict[str, Any]:
    precision, compile_ = MODES[mode]
    return {"name": "bench_gpu", "seed": 0,
            "dataset": {"name": "synthetic", "num_classes": args.classes, "train_per_class": args.train_per_class,
                        "test_per_class": 1, "image_size": 32, "channels": 3, "augment": True},
            "protocol": {"initial_classes": args.classes, "increment": args.classes, "class_order": "sorted"},
            "backbone": TINY_VIT if args.tiny else CIFAR_VIT, "strategy": {"name": "finetune"},
            "training": {"epochs": args.epochs, "batch_size": batch, "device": args.device, "precision": precision,
                         "compile": compile_, "data_path": "device",
                         "optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05},
                         "scheduler": {"name": "constant"}},
            "output": {"tensorboard": False, "save_model": False, "checkpoint": "off"}, "probes": []}


def build(args: argparse.Namespace, batch: int, mode: str) -> tuple[Any, Any, Any]:
    """The parsed config, the dataset and the model the toolkit would build (seeded the same)."""
    from avalanche.training.determinism.rng_manager import RNGManager

    from incremental.config import RunConfig, parse_dataclass
    from incremental.data import build_dataset
    from incremental.models.net import build_model

    cfg = parse_dataclass(RunConfig, run_config(args, batch, mode))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    RNGManager.set_random_seeds(cfg.seed)
    model = build_model(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size,
                        initial_classes=args.classes)
    return cfg, splits, model


def hand_written_loop(args: argparse.Namespace, batch: int, mode: str) -> tuple[float, float]:
    """(images/s, compile seconds) of the plain GPU-resident loop."""
    from incremental.training.engine import compile_seconds

    precision, compile_ = MODES[mode]
    cfg, splits, model = build(args, batch, mode)
    device = torch.device(args.device)
    images = splits.train.images.to(device)  # uint8 (N, 3, 32, 32)
    labels = splits.train.targets.to(device) if torch.is_tensor(splits.train.targets) \
        else torch.as_tensor(splits.train.targets, device=device)
    augment = splits.batch_augmentation
    mean = torch.tensor(augment.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(augment.std, device=device).view(1, -1, 1, 1)
    model = model.to(device)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, fused=cuda)
    forward = model
    if compile_:
        forward = torch.compile(model, mode=compile_ if isinstance(compile_, str) else None, dynamic=False)
    pad, size = 4, images.shape[-1]
    steps = torch.arange(size, device=device)
    compiled_before = compile_seconds()
    synchronize(device)
    start = time.perf_counter()
    seen = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(images), device=device)
        usable = len(order) - len(order) % batch if compile_ else len(order)  # full batches only when compiled
        for first in range(0, usable, batch):
            chosen = order[first:first + batch]
            n = len(chosen)
            x = torch.nn.functional.pad(images[chosen], (pad, pad, pad, pad))
            dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), device=device)
            rows, cols = (dy + steps)[:, None, :, None], (dx + steps)[:, None, None, :]
            x = x[torch.arange(n, device=device)[:, None, None, None], torch.arange(3, device=device)[None, :, None, None],
                  rows, cols]
            x = torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
            x = (x.float() / 255.0 - mean) / std
            if compile_ == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = forward(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += n
    synchronize(device)
    compiling = compile_seconds() - compiled_before
    return seen / (time.perf_counter() - start - compiling), compiling


def toolkit(args: argparse.Namespace, batch: int, mode: str) -> tuple[float, float]:
    """(images/s, compile seconds) of ``incremental run`` on the same workload."""
    from incremental.config import RunConfig, parse_dataclass
    from incremental.run import run

    cfg = parse_dataclass(RunConfig, run_config(args, batch, mode))
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run(cfg, Path(tmp) / "run", quiet=True)
    step = metrics["wall_time_s"][0]
    return metrics["train_samples"][0] * args.epochs / step["train"], step.get("compile", 0.0)


def training_flops_per_image(args: argparse.Namespace) -> float:
    """Forward plus backward FLOPs of one training image, counted by torch (on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, splits, model = build(args, 2, "fp32")
    x = torch.randn(2, splits.channels, splits.image_size, splits.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: a 1-block ViT, 10 classes, 1 epoch")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: fp32 bf16 bf16+compile (--tiny: fp32)")
    parser.add_argument("--compile-batches", type=int, nargs="+", default=None,
                        help="batch sizes for the compiled modes (default: all of --batches)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batches, args.epochs, args.classes, args.train_per_class = [16], 1, 10, 8
    args.modes = args.modes or (["fp32"] if args.tiny else ["fp32", "bf16", "bf16+compile"])
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore")
    from incremental.registry import load_builtins

    load_builtins()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, in both contenders
    flops = training_flops_per_image(args)
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{hardware}; torch {torch.__version__}; {args.classes} classes x {args.train_per_class} images, "
          f"{args.epochs} epochs; {flops / 1e9:.2f} GFLOP per training image")
    print(f"{'batch':>5} {'mode':<16} {'loop i/s':>9} {'toolkit i/s':>11} {'toolkit/loop':>12} "
          f"{'MFU loop':>8} {'MFU toolkit':>11} {'compile s (loop, toolkit)':>26}")
    for mode in args.modes:  # eager modes first: a timeout cuts the slow compiled ones
        for batch in args.batches:
            if MODES[mode][1] and args.compile_batches is not None and batch not in args.compile_batches:
                continue
            loop_rate, loop_compile = hand_written_loop(args, batch, mode)
            tool_rate, tool_compile = toolkit(args, batch, mode)
            mfu = (lambda rate: f"{100 * flops * rate / (args.peak_tflops * 1e12):7.1f}%") if args.peak_tflops \
                else (lambda rate: f"{'-':>8}")
            print(f"{batch:>5} {mode:<16} {loop_rate:>9.0f} {tool_rate:>11.0f} {tool_rate / loop_rate:>12.3f} "
                  f"{mfu(loop_rate):>8} {mfu(tool_rate):>11} {loop_compile:>12.1f}, {tool_compile:>11.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
