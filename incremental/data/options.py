"""The built-in datasets: their options, and where each one's loader lives.

Declared here, apart from the loaders, so that listing and validating a config never imports
torch: the registry imports a loader only when a dataset is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config.fields import MAX_SIZE, SEED_MAX, opt
from ..errors import ConfigError
from ..registry import DATASETS


# What the pixels are normalised with. A pre-trained model wants its own: auto (the mean and std
# of the weights backbone.pretrained names, as timm's or open_clip's config for them says; for a
# local file or no weights, dataset), dataset (the
# dataset's statistics; ImageNet's for image folders), imagenet (timm's IMAGENET_DEFAULT),
# inception (0.5 / 0.5: timm's augreg and in21k ViTs), none (pixels in [0, 1]: what PILOT
# feeds its pre-trained ViTs, a ToTensor without Normalize), clip (OpenAI CLIP's, which open_clip's
# ViT-B-16 and most of its weights were trained with).
Normalization = Literal["auto", "dataset", "imagenet", "inception", "clip", "none"]


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
    # fetch the archive into root when cifar-100-python is not there, through torchvision's
    # downloader, which checks its md5; url and md5 are torchvision's CIFAR100 (a mirror: set both)
    download: bool = False
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5: str = "eb9058c3a382ffc7106e4002c42a8d85"
    image_size: int = opt(32, ge=8, le=MAX_SIZE)  # resized once at load time when not 32
    augment: bool = True  # random crop (padding 4) and horizontal flip, as in PyCIL
    normalize: Normalization = "auto"

    def validate(self) -> None:
        if not self.url.startswith(("https://", "http://", "file://")):
            raise ConfigError(f"{self.url!r} is not a URL (https://, http:// or file://)", key="url")
        if len(self.md5) != 32 or any(c not in "0123456789abcdef" for c in self.md5.lower()):
            raise ConfigError(f"{self.md5!r} is not an md5 (32 hexadecimal digits)", key="md5")


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
    normalize: Normalization = "auto"


@dataclass(frozen=True)
class Publication:
    """Where a dataset that cannot be fetched by a library is published, and its folder layout."""

    title: str
    where: str
    val_dir: str = "test"  # PILOT's folders: train/ and test/

    def summary(self) -> str:
        """The registry's one line (and the builder's docstring's first)."""
        return (f"{self.title}: class folders under ROOT/train and ROOT/{self.val_dir} (not downloaded: a missing "
                f"folder's error says where it is published).")


# The image-folder datasets of the pre-trained-model protocols, as PILOT lays them out (its
# utils/data.py: ROOT/train and ROOT/test). None of them downloads: their licences leave
# distribution to the publishers, and PILOT's sampled subsets are shared as archives.
PUBLISHED_FOLDERS = {
    "imagenet": Publication("ImageNet (ILSVRC-2012)", "https://image-net.org/download.php (ILSVRC2012 train and "
                            "val, val sorted into one folder per class)", val_dir="val"),
    "imagenet_r": Publication("ImageNet-R", "https://github.com/hendrycks/imagenet-r; PILOT's 24,000/6,000 split: "
                              "https://drive.google.com/file/d/1SG4TbiL8_DooekztyCVK8mPmfhMo8fkR"),
    "imagenet_a": Publication("ImageNet-A", "https://github.com/hendrycks/natural-adv-examples; PILOT's split: "
                              "https://drive.google.com/file/d/19l52ua_vvTtttgVRziCZJjal0TPE9f2p"),
    "cub200": Publication("CUB-200-2011", "https://www.vision.caltech.edu/datasets/cub_200_2011/; PILOT's split: "
                          "https://drive.google.com/file/d/1XbUpnWpJPnItt5zQ6sHJnsjPncnNLvWb"),
    "objectnet": Publication("ObjectNet", "https://objectnet.dev/; PILOT's 200-class subset (file list): "
                             "https://drive.google.com/file/d/147Mta-HcENF6IhZ8dvPnZ93Romcie7T6"),
    "omnibenchmark": Publication("OmniBenchmark", "https://github.com/ZhangYuanhan-AI/OmniBenchmark; PILOT's "
                                 "300-class subset: https://drive.google.com/file/d/1AbCP3zBMtv_TDXJypOCnOgX8hJmvJm3u"),
    "vtab": Publication("VTAB (PILOT's 5 datasets, 50 classes)", "https://google-research.github.io/task_adaptation/; "
                        "PILOT's subset: https://drive.google.com/file/d/1xUiwlnx4k0oDhYi26KL5KwrCAya-mvJ_"),
}


@dataclass
class PublishedFolderConfig(ImageFolderConfig):
    """An image-folder dataset of PILOT's, its test images in ROOT/test."""

    val_dir: str = "test"


DATASETS.declare("digits", "incremental.data.digits:build_digits", config=DigitsConfig,
                 summary="UCI handwritten digits from scikit-learn: 1797 8x8 images, 10 classes.")
DATASETS.declare("synthetic", "incremental.data.synthetic:build_synthetic", config=SyntheticConfig,
                 summary="Generated sinusoid patterns, any number of classes; learnable, not trivial.")
DATASETS.declare("cifar100", "incremental.data.cifar:build_cifar100", config=Cifar100Config,
                 summary="CIFAR-100 (50000 train / 10000 test, 32x32): a cifar-100-python folder, or download: true.")
DATASETS.declare("imagefolder", "incremental.data.imagefolder:build_imagefolder", config=ImageFolderConfig,
                 summary="ImageNet-style train/val class folders; a class list selects subsets (ImageNet-100).")
for _name, _publication in PUBLISHED_FOLDERS.items():
    DATASETS.declare(_name, f"incremental.data.imagefolder:build_{_name}",
                     config=ImageFolderConfig if _publication.val_dir == "val" else PublishedFolderConfig,
                     summary=_publication.summary())
