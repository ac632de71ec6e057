"""scikit-learn's handwritten digits: real data shipped inside a package (the default)."""

from __future__ import annotations

import numpy as np
import torch

from .options import DigitsConfig
from .base import DatasetSplits, TensorImageDataset, resize_uint8, tensor_transforms

# What a text encoder reads for each class (CLIP's MNIST prompts name the digit the same way).
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def build_digits(cfg: DigitsConfig) -> DatasetSplits:
    """UCI handwritten digits from scikit-learn: 1797 8x8 images, 10 classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).round()
    images = resize_uint8(images.to(torch.uint8).unsqueeze(1), cfg.image_size)
    targets = digits.target.astype(np.int64)
    # The split is fixed (random_state=0, stratified) so every run, whatever its seed,
    # is scored on the same test images.
    train_idx, test_idx = train_test_split(np.arange(len(targets)), test_size=cfg.test_fraction,
                                           stratify=targets, random_state=0)
    train_tf, eval_tf, batch_augmentation = tensor_transforms(cfg.image_size, [0.5], [0.5], augment=cfg.augment, flip=False)
    return DatasetSplits(
        train=TensorImageDataset(images[train_idx], targets[train_idx].tolist()),
        test=TensorImageDataset(images[test_idx], targets[test_idx].tolist()),
        class_names=list(DIGIT_NAMES),
        channels=1,
        image_size=cfg.image_size,
        train_transform=train_tf,
        eval_transform=eval_tf,
        batch_augmentation=batch_augmentation,
        mean=(0.5,),
        std=(0.5,),
    )
