"""Image folders at GPU speed: the PIL DataLoader against the device path (bytes read by
workers, JPEGs decoded on the GPU), for the data alone and for ViT-S/16 training at 224 px.

    python experiments/bench/bench_jpeg.py --images 4000                 # a GPU machine
    python experiments/bench/bench_jpeg.py --tiny                        # the CPU smoke mode CI runs

Writes ``--images`` real JPEGs of ImageNet's typical size (500 x 375, quality 90, smooth
random content) in ``--classes`` class folders (train and a small val), then measures, with
``num_workers: auto`` (the CPU cores per GPU, less one):

- ``data``: images/s of one epoch of training batches (decoded, cropped, resized, flipped,
  normalised, on the device), no model;
- ``train``: images/s of ``incremental run`` training ViT-S/16 (embed 384, depth 12, 6 heads,
  patch 16) at 224 px on one experience of all classes, bf16 on a GPU (``wall_time_s[0].train``
  over the epochs; the first epoch included).

The data path is not the bottleneck when ``data`` is well above ``train``'s rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

VIT_S16 = {"name": "vit", "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "drop_path_rate": 0.0}
TINY_VIT = {"name": "vit", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "drop_path_rate": 0.0}


def write_jpegs(root: Path, images: int, classes: int, size: tuple[int, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for split, count in (("train", images), ("val", max(classes, images // 20))):
        for i in range(count):
            folder = root / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            f = rng.uniform(0.01, 0.1, 3)
            pixels = np.stack([np.sin(xx * f[k] + yy * f[(k + 1) % 3] + rng.uniform(0, 6)) for k in range(3)], -1)
            pixels = (pixels * 100 + 128 + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)


def run_config(args: argparse.Namespace, root: Path, data_path: str) -> dict[str, Any]:
    return {"name": "bench_jpeg", "seed": 0,
            "dataset": {"name": "imagefolder", "root": str(root), "image_size": args.image_size},
            "protocol": {"initial_classes": args.classes, "increment": args.classes, "class_order": "sorted"},
            "backbone": TINY_VIT if args.tiny else VIT_S16, "strategy": {"name": "finetune"},
            "training": {"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device,
                         "precision": "bf16" if args.device.startswith("cuda") else "fp32",
                         "data_path": data_path, "num_workers": "auto",
                         "optimizer": {"name": "adamw", "lr": 5e-4}, "scheduler": {"name": "constant"}},
            "output": {"tensorboard": False, "save_model": False, "checkpoint": "off"}, "probes": []}


def data_rate(args: argparse.Namespace, root: Path, data_path: str) -> float:
    """Images/s of one epoch of augmented training batches on the device, no model."""
    from torch.utils.data import DataLoader

    from incremental.config import RunConfig, parse_dataclass
    from incremental.data import build_dataset
    from incremental.data.device import resolve
    from incremental.data.jpeg import FileBatchLoader
    from incremental.protocol import build_benchmark, make_class_split
    from incremental.run.environment import resolve_workers

    cfg = parse_dataclass(RunConfig, run_config(args, root, data_path))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    data = build_benchmark(splits, make_class_split(cfg.protocol, splits.num_classes, 0)).train_stream[0].dataset
    device, workers = torch.device(args.device), resolve_workers("auto")
    if data_path == "device":
        loader: Any = FileBatchLoader(resolve(data), device, splits.batch_augmentation, batch_size=args.batch_size,
                                      train=True, shuffle=True, num_workers=workers)
    else:
        loader = DataLoader(data.train(), batch_size=args.batch_size, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            prefetch_factor=4 if workers else None)
    start, seen = time.perf_counter(), 0
    for x, *_ in loader:
        x = x.to(device, non_blocking=True)
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def train_rate(args: argparse.Namespace, root: Path, data_path: str) -> float:
    from incremental.config import RunConfig, parse_dataclass
    from incremental.run import run

    cfg = parse_dataclass(RunConfig, run_config(args, root, data_path))
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run(cfg, Path(tmp) / "run", quiet=True)
    return metrics["train_samples"][0] * args.epochs / metrics["wall_time_s"][0]["train"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke mode: 40 small JPEGs, a 1-block ViT at 32 px")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    jpeg_size = (500, 375)
    if args.tiny:
        args.images, args.classes, args.image_size, args.batch_size, args.epochs = 40, 4, 32, 8, 1
        jpeg_size = (64, 48)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore")
    from incremental.registry import load_builtins
    from incremental.run.environment import resolve_workers

    load_builtins()
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        start = time.perf_counter()
        write_jpegs(root, args.images, args.classes, jpeg_size)
        print(f"{hardware}; torch {torch.__version__}; {args.images} JPEGs of {jpeg_size[0]}x{jpeg_size[1]} written in "
              f"{time.perf_counter() - start:.1f} s; {resolve_workers('auto')} workers; batch {args.batch_size}, "
              f"{args.image_size} px")
        print(f"{'path':<8} {'data i/s':>9} {'train i/s':>10}")
        for data_path in ("loader", "device"):
            print(f"{data_path:<8} {data_rate(args, root, data_path):>9.0f} {train_rate(args, root, data_path):>10.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
