"""Procedurally generated images with many classes, for fast tests at the 100-class scale."""

from __future__ import annotations

import math

import torch

from .options import SyntheticConfig
from .base import DatasetSplits, TensorImageDataset, tensor_transforms


def _class_patterns(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    """One smooth pattern per class: a sum of three oriented sinusoids with a class colour."""
    size, n = cfg.image_size, cfg.num_classes
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.rand(n, 3, 1, 1, generator=gen) * math.pi
    freq = 1 + torch.rand(n, 3, 1, 1, generator=gen) * 4
    phase = torch.rand(n, 3, 1, 1, generator=gen) * 2 * math.pi
    waves = torch.sin(freq * math.pi * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
    pattern = waves.mean(dim=1, keepdim=True)  # (n, 1, H, W)
    colour = torch.rand(n, cfg.channels, 1, 1, generator=gen) * 1.5 + 0.25
    return pattern * colour


def _samples(patterns: torch.Tensor, per_class: int, cfg: SyntheticConfig,
             gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    labels = torch.arange(len(patterns)).repeat_interleave(per_class)
    base = patterns[labels]
    contrast = 0.7 + 0.6 * torch.rand(len(labels), 1, 1, 1, generator=gen)
    shift = 0.3 * torch.randn(len(labels), 1, 1, 1, generator=gen)
    noisy = base * contrast + shift + cfg.noise * torch.randn(base.shape, generator=gen)
    images = ((noisy.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8)
    return images, labels.tolist()


def build_synthetic(cfg: SyntheticConfig) -> DatasetSplits:
    """Generated sinusoid patterns, any number of classes; learnable, not trivial."""
    gen = torch.Generator().manual_seed(cfg.seed)
    patterns = _class_patterns(cfg, gen)
    train_images, train_labels = _samples(patterns, cfg.train_per_class, cfg, gen)
    test_images, test_labels = _samples(patterns, cfg.test_per_class, cfg, gen)
    mean, std = [0.5] * cfg.channels, [0.25] * cfg.channels
    train_tf, eval_tf, batch_augmentation = tensor_transforms(cfg.image_size, mean, std, augment=cfg.augment, flip=True)
    return DatasetSplits(
        train=TensorImageDataset(train_images, train_labels),
        test=TensorImageDataset(test_images, test_labels),
        class_names=[f"pattern{i}" for i in range(cfg.num_classes)],
        channels=cfg.channels,
        image_size=cfg.image_size,
        train_transform=train_tf,
        eval_transform=eval_tf,
        batch_augmentation=batch_augmentation,
        mean=tuple(mean),
        std=tuple(std),
    )
