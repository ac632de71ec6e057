"""Parameters and MACs of every registered backbone, built through the toolkit's registry.

At 224 px with a 1000-class linear head (what the papers report) each entry is checked
against its paper's figures; at the small-image settings (32 px, 3 channels, no head) the
sizes the toolkit actually trains on CIFAR-like data are listed. Prints Markdown tables.

    python experiments/backbones/profile_backbones.py            # both tables
    python experiments/backbones/profile_backbones.py --tolerance 2
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn

from incremental.config import Component, parse_dataclass
from incremental.models.compress import count_macs
from incremental.models.net import build_backbone
from incremental.registry import BACKBONES, load_builtins

# name, registry entry, options at 224 px, paper params (M), paper GMACs ("GFLOPs" in the papers), source
AT_224: list[tuple[str, str, dict[str, Any], float, float | None, str]] = [
    ("ViT-B/16", "timm_vit", {"model": "vit_base_patch16_224"}, 86.6, 17.6, "Dosovitskiy et al. 2021; DeiT Table 1"),
    ("ViT-S/16 (DeiT-S)", "timm_vit", {"model": "vit_small_patch16_224"}, 22.1, 4.6, "Touvron et al. 2021 Table 1"),
    ("ViT-B/16 (vit, 224 px)", "vit", {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
     86.6, 17.6, "as ViT-B/16"),
    ("Swin-T", "swin", {"variant": "tiny"}, 28.0, 4.5, "Liu et al. 2021 Table 1"),
    ("Swin-S", "swin", {"variant": "small"}, 50.0, 8.7, "Liu et al. 2021 Table 1"),
    ("Swin-B", "swin", {"variant": "base"}, 88.0, 15.4, "Liu et al. 2021 Table 1"),
    ("S3-T", "s3_tiny", {}, 28.0, 4.7, "Chen et al. 2021 Table 3"),
    ("S3-S", "s3_small", {}, 50.0, 9.5, "Chen et al. 2021 Table 3"),
    ("S3-B", "s3_base", {}, 71.0, 13.6, "Chen et al. 2021 Table 3"),
    ("ResNet-18", "resnet18", {"stem": "imagenet"}, 11.7, 1.8, "He et al. 2016 Table 1"),
]

# the small-image settings used on CIFAR-size inputs (32 px)
AT_32: list[tuple[str, str, dict[str, Any]]] = [
    ("ViT DyTox-CIFAR (vit default)", "vit", {}),
    ("ViT conv stem (ViTIL)", "vit", {"stem": "conv"}),
    ("ViT-S/16 at patch 4 (timm_vit)", "timm_vit", {"model": "vit_small_patch16_224", "patch_size": 4}),
    ("ViT-DLCL 24 x 192 (vit_dlcl default)", "vit_dlcl", {}),
    ("Swin-T, patch 2, windows 4", "swin", {}),
    ("S3-T, patch 2", "s3_tiny", {}),
    ("ResNet-18, CIFAR stem", "resnet18", {}),
    ("ResNet-32 (iCaRL/PODNet)", "resnet32", {}),
]


def build(entry_name: str, options: dict[str, Any], size: int) -> nn.Module:
    entry = BACKBONES.get(entry_name)
    return build_backbone(Component(entry_name, parse_dataclass(entry.config_cls, options)),
                          in_chans=3, img_size=size)


def with_head(backbone: nn.Module, classes: int) -> nn.Module:
    """The backbone and a linear classifier, keeping timm's method names for count_macs."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = backbone, nn.Linear(backbone.num_features, classes)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone.forward_features(x)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return self.head(self.backbone.forward_head(x, pre_logits=True))

    return Classifier()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=2.0, help="allowed parameter difference, %%")
    args = parser.parse_args()
    load_builtins("backbones")
    torch.manual_seed(0)

    print("## At 224 px, 1000-class head\n")
    print("| model | entry | params (M) | paper | diff % | GMACs | paper | diff % | source |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    failures = []
    for label, entry, options, paper_params, paper_gmacs, source in AT_224:
        model = with_head(build(entry, options, 224), 1000)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9
        dp = 100 * (params - paper_params) / paper_params
        dm = 100 * (gmacs - paper_gmacs) / paper_gmacs if paper_gmacs else float("nan")
        if abs(dp) > args.tolerance:
            failures.append(f"{label}: {params:.2f}M vs {paper_params}M")
        print(f"| {label} | `{entry}` | {params:.2f} | {paper_params} | {dp:+.1f} | {gmacs:.2f} | "
              f"{paper_gmacs} | {dm:+.1f} | {source} |")
        del model

    print("\n## At 32 px (3 channels, no head): what trains on CIFAR-size images\n")
    print("| setting | entry | params (M) | MMACs |")
    print("|---|---|---:|---:|")
    for label, entry, options in AT_32:
        backbone = build(entry, options, 32)
        params = sum(p.numel() for p in backbone.parameters()) / 1e6
        mmacs = count_macs(backbone, torch.randn(1, 3, 32, 32)) / 1e6
        print(f"| {label} | `{entry}` | {params:.3f} | {mmacs:.1f} |")

    if failures:
        print(f"\nparameters off by more than {args.tolerance}%: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"\nall parameter counts within {args.tolerance}% of the papers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
