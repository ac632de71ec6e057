"""What every dataset loader returns, and the shared tensor-image plumbing."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..registry import DATASETS
from .device import BatchAugmentation, answering_positions, register_source


@dataclass
class DatasetSplits:
    """Train and test splits of one dataset, before any class-incremental splitting.

    ``train``/``test`` yield ``(image, label)`` with raw images (uint8 tensors or PIL
    images); the transforms turn them into normalised float tensors, the training one with
    augmentation. Keeping transforms outside the datasets lets Avalanche switch between
    them (exemplar selection and evaluation use the eval transform on training data).
    """

    train: Dataset
    test: Dataset
    class_names: list[str]
    channels: int
    image_size: int
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]
    # The per-channel normalisation that ends both transforms: probes undo it to perturb
    # images in [0, 1] pixel space, where corruption and attack budgets are defined.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # The same transforms for whole uint8 batches on the device (incremental.data.device for
    # tensor datasets, incremental.data.jpeg's FileBatchAugmentation for image folders).
    # None: the dataset takes the DataLoader path.
    batch_augmentation: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), for small-image datasets."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int]):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.slot = register_source(self)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if answering_positions():  # the device data path asks where each sample lives
            return torch.tensor([self.slot, index]), self.targets[index]
        return self.images[index], self.targets[index]


Statistics = tuple[tuple[float, ...], tuple[float, ...]]  # a per-channel mean and std
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5,) * 3, (0.5,) * 3),
                  "clip": (CLIP_MEAN, CLIP_STD),
                  "none": ((0.0,) * 3, (1.0,) * 3)}


def normalization(choice: str, dataset_mean: Sequence[float], dataset_std: Sequence[float],
                  weights_statistics: Statistics | None = None) -> Statistics:
    """The mean and std of the ``normalize`` option (see incremental.data.options);
    ``weights_statistics``: those of the named pre-trained weights, which ``auto`` takes."""
    if choice == "auto":
        mean, std = weights_statistics or (dataset_mean, dataset_std)
    else:
        mean, std = (dataset_mean, dataset_std) if choice == "dataset" else NORMALIZATIONS[choice]
    return tuple(mean), tuple(std)


def tensor_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], *,
                      augment: bool, flip: bool, resize: int | None = None) -> tuple[Callable, Callable, BatchAugmentation]:
    """Train and eval transforms for uint8 tensor images of ``image_size``: random crop with
    padding (size/8, i.e. the usual 4 px at 32 px) and optional flip, then scaling and
    normalising, and a bilinear resize to ``resize`` (the image size the model sees, when the
    images are stored smaller); and the same as one batched augmentation for the device data path."""
    from torchvision.transforms import v2

    padding = max(1, image_size // 8) if augment else 0
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if resize is not None and resize != image_size:
        finish.insert(1, v2.Resize((resize, resize), antialias=False))
    train_aug = []
    if augment:
        train_aug.append(v2.RandomCrop(image_size, padding=padding))
        if flip:
            train_aug.append(v2.RandomHorizontalFlip())
    batch = BatchAugmentation(tuple(mean), tuple(std), padding=padding, flip=augment and flip,
                              resize=resize if resize != image_size else None)
    return v2.Compose(train_aug + finish), v2.Compose(finish), batch


def resize_uint8(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 (N, C, H, W) batch to ``size`` (square, or height and width),
    done once at load time; antialiased when shrinking (enlarging, it is plain bilinear)."""
    height, width = (size, size) if isinstance(size, int) else size
    if images.shape[-2] == height and images.shape[-1] == width:
        return images
    resized = torch.nn.functional.interpolate(images.float(), size=(height, width), mode="bilinear",
                                              align_corners=False, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def root_folder(root: str, *, example: str) -> Path:
    """The ``root`` option as a path; an empty one (``Path("")`` would mean the current
    folder) is an error telling how to set it."""
    if not root:
        raise DataError(f"not set: pass --set dataset.root={example}", key="root")
    return Path(root).expanduser()


def require_dir(path: Path, *, key: str, layout: str) -> Path:
    """The folder, or a DataError saying what layout was expected there."""
    if not path.exists():
        raise DataError(f"{path} does not exist; expected {layout}", key=key)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; expected {layout}", key=key)
    return path


# ----------------------------------------------------------------------------- the data guard
#
# Every value a loader reads from a file passes one of these before it becomes a tensor, and
# build_dataset checks what every loader (plugins' too) returns: a file that unpickles fine but
# holds a string where pixels belong, labels that are not integers, or pixel values past 255
# ends in one line naming the file, never in a traceback or a silent cast.


def pixels_uint8(values: Any, *, source: Path | str, field: str, key: str = "root") -> Any:
    """``values`` as a uint8 numpy array: integers, or whole floats, within 0..255."""
    import numpy as np

    try:
        array = np.asarray(values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{source}: {field} cannot be read as pixels ({exc})", key=key) from None
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise DataError(f"{source}: {field} holds {array.dtype.name} values, not pixels", key=key)
    low, high = array.min(), array.max()
    if not (0 <= low and high <= 255) or (array.dtype.kind == "f" and not np.all(np.floor(array) == array)):
        raise DataError(f"{source}: {field} holds values in [{low}, {high}], not whole pixels in 0..255", key=key)
    return array.astype(np.uint8)


def integer_labels(values: Any, *, source: Path | str, field: str, num_classes: int | None = None,
                   key: str = "root") -> list[int]:
    """``values`` as a list of class ids (ints in 0..num_classes-1 when given)."""
    import numbers

    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise DataError(f"{source}: {field} is a {type(values).__name__}, not a list of labels", key=key)
    labels = list(values)
    bad = [v for v in labels if not isinstance(v, numbers.Integral) or isinstance(v, bool)]
    if bad:
        raise DataError(f"{source}: {field} holds {type(bad[0]).__name__} values, not integer labels", key=key)
    labels = [int(v) for v in labels]
    if num_classes is not None:
        outside = sorted({v for v in labels if not 0 <= v < num_classes})
        if outside:
            raise DataError(f"{source}: {field} has labels outside 0..{num_classes - 1}: {outside[:5]}", key=key)
    return labels


def class_names(values: Any, *, source: Path | str, field: str, key: str = "root") -> list[str]:
    """``values`` as a list of class names (bytes decoded as UTF-8)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise DataError(f"{source}: {field} is a {type(values).__name__}, not a list of names", key=key)
    names = []
    for value in values:
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{source}: {field} holds names that are not UTF-8", key=key) from None
        if not isinstance(value, str):
            raise DataError(f"{source}: {field} holds {type(value).__name__} values, not names", key=key)
        names.append(value)
    return names


def check_splits(splits: DatasetSplits, name: str) -> DatasetSplits:
    """What every loader returns, checked once: names, labels within the class count, and
    the sizes a run depends on."""
    source = f"dataset {name!r}"
    names = class_names(splits.class_names, source=source, field="class_names")
    for split_name, split in (("train", splits.train), ("test", splits.test)):
        integer_labels(getattr(split, "targets", None), source=source, field=f"{split_name} targets",
                       num_classes=len(names))
    if splits.channels not in (1, 3) or splits.image_size < 1:
        raise DataError(f"{source}: {splits.channels} channels of {splits.image_size} px are not images", key="root")
    return splits


def build_dataset(name: str, config: Any, weights_statistics: Statistics | None = None) -> DatasetSplits:
    """Build a registered dataset, its values checked; DataErrors get the ``dataset.`` key prefix.
    ``weights_statistics``: the named pre-trained weights' mean and std, for a builder that
    normalises with them (``normalize: auto``)."""
    entry = DATASETS.get(name)
    extra = {"weights_statistics": weights_statistics} \
        if "weights_statistics" in inspect.signature(entry.obj).parameters else {}
    try:
        return check_splits(entry.obj(config, **extra), name)
    except DataError as exc:
        if exc.key and not exc.key.startswith("dataset."):
            exc.key = f"dataset.{exc.key}"
        raise
