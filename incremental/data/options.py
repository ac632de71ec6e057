"""The built-in datasets: their options, and where each one's loader lives.

Declared here, apart from the loaders, so that listing and validating a config never imports
torch: the registry imports a loader only when a dataset is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.fields import MAX_SIZE, SEED_MAX, opt
from ..registry import DATASETS


# What the pixels are normalised with. A pre-trained model wants its own: dataset (the
# dataset's statistics; ImageNet's for image folders), imagenet (timm's IMAGENET_DEFAULT),
# inception (0.5 / 0.5: timm's augreg and in21k ViTs), none (pixels in [0, 1]: what PILOT
# feeds its pre-trained ViTs, a ToTensor without Normalize), clip (OpenAI CLIP's, which open_clip's
# ViT-B-16 and most of its weights were trained with).
Normalization = Literal["dataset", "imagenet", "inception", "clip", "none"]


@dataclass
class DigitsConfig:
    image_size: int = opt(32, ge=8, le=MAX_SIZE)  # the 8x8 scans are upsampled (bilinear) to this size
    test_fraction: float = opt(0.25, gt=0, lt=1)
    augment: bool = True  # random crop with padding; no flip (digits are not mirror-symmetric)


@dataclass
class SyntheticConfig:
    num_classes: int = opt(100, ge=2, le=100_000)
    train_per_class: int = opt(20, ge=1, le=100_000)
    test_per_class: int = opt(10, ge=1, le=100_000)
    image_size: int = opt(32, ge=4, le=MAX_SIZE)
    channels: int = opt(3, ge=1, le=3)
    noise: float = opt(0.35, ge=0, le=100)  # std of the per-pixel noise; the pattern spans about [-1, 1]
    seed: int = opt(0, ge=0, le=SEED_MAX)  # fixes the class patterns and samples, independently of the run seed
    augment: bool = False


@dataclass
class Cifar100Config:
    root: str = ""  # the cifar-100-python folder, or the folder that contains it
    image_size: int = opt(32, ge=8, le=MAX_SIZE)  # resized once at load time when not 32
    augment: bool = True  # random crop (padding 4) and horizontal flip, as in PyCIL
    normalize: Normalization = "dataset"


@dataclass
class ImageFolderConfig:
    root: str = ""
    train_dir: str = "train"
    val_dir: str = "val"
    # A text file with one class folder name per line (e.g. the 100 wnids of ImageNet-100);
    # its order is the class-id order. Without it, every class folder is used, sorted.
    class_list: str | None = None
    # A file naming the class folders for a text encoder (CLIP's class-name heads): lines
    # "n01440764 tench, Tinca tinca" (ImageNet's LOC_synset_mapping.txt: the first name is used),
    # or a JSON object {"n01440764": "tench"} or ImageNet's {"0": ["n01440764", "tench"]}. Without
    # it the folder names are the class names.
    class_names: str | None = None
    image_size: int = opt(224, ge=8, le=MAX_SIZE)
    eval_resize_ratio: float = opt(0.875, gt=0, le=1)  # resize to size/ratio, then center crop
    augment: bool = True  # RandomResizedCrop and flip
    normalize: Normalization = "dataset"


DATASETS.declare("digits", "incremental.data.digits:build_digits", config=DigitsConfig,
                 summary="UCI handwritten digits from scikit-learn: 1797 8x8 images, 10 classes.")
DATASETS.declare("synthetic", "incremental.data.synthetic:build_synthetic", config=SyntheticConfig,
                 summary="Generated sinusoid patterns, any number of classes; learnable, not trivial.")
DATASETS.declare("cifar100", "incremental.data.cifar:build_cifar100", config=Cifar100Config,
                 summary="CIFAR-100 (50000 train / 10000 test, 32x32) from your cifar-100-python folder.")
DATASETS.declare("imagefolder", "incremental.data.imagefolder:build_imagefolder", config=ImageFolderConfig,
                 summary="ImageNet-style train/val class folders; a class list selects subsets (ImageNet-100).")

