"""Occlusion robustness (Paul and Chen 2022, Naseer et al. 2021): CutOut holes covering a
fraction of the image, and for patch-token models, random patch drop on the token grid."""

from __future__ import annotations

import math

import torch

from .base import Probe, ProbeBatch, ProbeResult


def cutout(images: torch.Tensor, fraction: float, generator: torch.Generator, fill: str = "zero") -> torch.Tensor:
    """One square hole per image covering ``fraction`` of its area, at a random position
    inside the image."""
    n, _, h, w = images.shape
    side = max(1, min(h, w, int(round(math.sqrt(fraction * h * w)))))
    tops = torch.randint(0, h - side + 1, (n,), generator=generator)
    lefts = torch.randint(0, w - side + 1, (n,), generator=generator)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    hole = ((ys >= tops.view(n, 1, 1)) & (ys < (tops + side).view(n, 1, 1))
            & (xs >= lefts.view(n, 1, 1)) & (xs < (lefts + side).view(n, 1, 1)))
    return _fill(images, hole.unsqueeze(1).to(images.device), fill)


def patch_drop(images: torch.Tensor, fraction: float, grid: tuple[int, int], generator: torch.Generator,
               fill: str = "zero") -> torch.Tensor:
    """Blank ``fraction`` of the cells of the model's token grid, chosen at random per image."""
    n, _, h, w = images.shape
    cells = grid[0] * grid[1]
    dropped = max(1, int(round(fraction * cells)))
    scores = torch.rand(n, cells, generator=generator)
    chosen = scores.argsort(dim=1)[:, :dropped]
    mask = torch.zeros(n, cells, dtype=torch.bool).scatter_(1, chosen, True).view(n, 1, *grid).float()
    hole = torch.nn.functional.interpolate(mask, size=(h, w), mode="nearest").bool()
    return _fill(images, hole.to(images.device), fill)


def _fill(images: torch.Tensor, hole: torch.Tensor, fill: str) -> torch.Tensor:
    value = images.mean(dim=(1, 2, 3), keepdim=True) if fill == "mean" else torch.zeros_like(images[:, :1, :1, :1])
    return torch.where(hole, value.expand_as(images), images)


class MaskingProbe(Probe):
    """Accuracy with a CutOut hole of each area fraction, and with randomly dropped patches."""

    default_samples = 100

    def forward_passes(self, batch: ProbeBatch) -> int:
        per_fraction = 2 if self.config.patch_drop and batch.patch_grid is not None else 1
        return (1 + len(self.config.fractions) * per_fraction) * batch.chunks()

    def run(self, batch: ProbeBatch) -> ProbeResult:
        scalars = {"clean_accuracy": batch.accuracy(batch.images)}
        cut, drop = {}, {}
        for fraction in self.config.fractions:
            masked = cutout(batch.images, fraction, batch.generator, self.config.fill)
            cut[str(fraction)] = scalars[f"cutout/{fraction:g}"] = batch.accuracy(masked)
            if self.config.patch_drop and batch.patch_grid is not None:
                masked = patch_drop(batch.images, fraction, batch.patch_grid, batch.generator, self.config.fill)
                drop[str(fraction)] = scalars[f"patch_drop/{fraction:g}"] = batch.accuracy(masked)
        details = {"clean_accuracy": scalars["clean_accuracy"], "cutout": cut,
                   "patch_drop": drop if batch.patch_grid is not None else None,
                   "patch_grid": list(batch.patch_grid) if batch.patch_grid else None}
        return ProbeResult(scalars=scalars, details=details)
