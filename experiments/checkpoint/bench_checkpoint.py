"""What a per-experience checkpoint costs: file size, save and load time (weights_only), for
backbones from the default digits ViT to ViT-B/16 at 224 px, with AdamW moments as after an
experience (the checkpoint stores them for inspection).

    python experiments/checkpoint/bench_checkpoint.py [--folder DIR]

Prints one row per backbone; the folder decides the disk being measured (default: a
temporary folder).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from incremental.checkpoint import load_checkpoint, rng_state, save_checkpoint
from incremental.config import RunConfig, parse_dataclass
from incremental.models.net import build_model
from incremental.registry import load_builtins

BACKBONES = {
    "digits default ViT (32 px)": ({"name": "vit", "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4,
                                    "global_pool": "avg"}, 1, 32),
    "resnet32 (CIFAR)": ({"name": "resnet32"}, 3, 32),
    "ViT-S/16 (224 px)": ({"name": "vit", "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}, 3, 224),
    "ViT-B/16 (224 px)": ({"name": "vit", "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}, 3, 224),
}


def checkpoint_state(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments, as at the end of an experience
    return {"experience": 0, "num_experiences": 10, "config": "", "model": model.state_dict(),
            "num_classes": 100, "optimizer": optimizer.state_dict(), "scheduler": {}, "clock": {},
            "plugins": [{"exemplars": {str(c): [0, list(range(20))] for c in range(100)}}],
            "rng": rng_state(), "results": "{}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    load_builtins()

    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        path = Path(tmp) / "checkpoint.pt"
        print(f"{'backbone':<28} {'params':>8} {'size MB':>8} {'save s':>7} {'load s':>7}")
        for name, (spec, chans, size) in BACKBONES.items():
            cfg = parse_dataclass(RunConfig, {"backbone": spec})
            model = build_model(cfg.backbone, in_chans=chans, img_size=size, initial_classes=100)
            state = checkpoint_state(model)
            start = time.perf_counter()
            save_checkpoint(state, path)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            load_checkpoint(path)
            loaded = time.perf_counter() - start
            params = sum(p.numel() for p in model.parameters())
            print(f"{name:<28} {params / 1e6:>7.2f}M {path.stat().st_size / 1e6:>8.1f} {saved:>7.2f} {loaded:>7.2f}")


if __name__ == "__main__":
    main()
