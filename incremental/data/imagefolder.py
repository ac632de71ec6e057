"""ImageNet-style folders: ROOT/train/<class>/<image> and ROOT/val/<class>/<image>."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from .options import PUBLISHED_FOLDERS, ImageFolderConfig, Publication
from ..errors import DataError
from .base import IMAGENET_MEAN, IMAGENET_STD, DatasetSplits, Statistics, normalization, require_dir, root_folder
from .device import answering_positions, register_source
from .jpeg import FileBatchAugmentation

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFileDataset(Dataset):
    """(path, label) pairs read lazily as RGB PIL images (or, on the device data path, read as
    bytes and decoded on the device: incremental.data.jpeg)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.slot = register_source(self)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        if answering_positions():  # the device data path asks where each sample lives
            import torch

            return torch.tensor([self.slot, index]), label
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            # DecompressionBombError: more pixels than Pillow's safety limit (a crafted file)
            raise DataError(f"cannot read image {path}: {exc}", key="dataset.root") from None


def read_class_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected a text file with one class folder name per line",
                        key="class_list")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise DataError(f"cannot read {path}: {reason}", key="class_list") from None
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    if not names:
        raise DataError(f"{path} lists no classes", key="class_list")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path} lists classes more than once: {duplicates[:5]}", key="class_list")
    return names


def read_class_names(path: Path, folders: list[str]) -> list[str]:
    """The name of each class folder from a ``class_names`` file (see ImageFolderConfig); every
    folder must be named."""
    import json

    if not path.is_file():
        raise DataError(f"{path} does not exist; expected lines 'FOLDER name' or a JSON object", key="class_names")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise DataError(f"cannot read {path}: {reason}", key="class_names") from None
    mapping: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}", key="class_names") from None
        for key, value in loaded.items():
            if isinstance(value, str):
                mapping[key] = value
            elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
                mapping[value[0]] = value[1]  # ImageNet's imagenet_class_index.json: {"0": [wnid, name]}
            else:
                raise DataError(f"{path}: the entry {key!r} is neither a name nor [folder, name]", key="class_names")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(None, 1)
            if len(parts) < 2:
                raise DataError(f"{path}:{number}: expected 'FOLDER name', got {line!r}", key="class_names")
            mapping[parts[0]] = parts[1].split(",")[0].strip()
    missing = [f for f in folders if not mapping.get(f, "").strip()]
    if missing:
        raise DataError(f"{path} names no class for {len(missing)} folder(s): {missing[:5]}", key="class_names")
    return [mapping[f].strip() for f in folders]


def _scan(split_dir: Path, classes: list[str], layout: str) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DataError(f"{class_dir} is missing; expected {layout}", key="root")
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"{class_dir} holds no images ({', '.join(EXTENSIONS[:3])}, ...)", key="root")
        samples.extend((str(p), label) for p in files)
    return samples


def build_imagefolder(cfg: ImageFolderConfig, weights_statistics: Statistics | None = None,
                      publication: Publication | None = None) -> DatasetSplits:
    """ImageNet-style train/val class folders; a class list selects subsets (ImageNet-100).
    ``publication``: a named dataset's, whose errors say where it is published."""
    from torchvision import transforms as T

    published = f" ({publication.title} is published at {publication.where})" if publication else ""
    try:
        root = root_folder(cfg.root, example="/path/holding/train/and/val")
    except DataError as exc:
        exc.message += published
        raise
    layout = f"ROOT/{cfg.train_dir}/<class>/<image> and ROOT/{cfg.val_dir}/<class>/<image>{published}"
    require_dir(root, key="root", layout=layout)
    train_dir = require_dir(root / cfg.train_dir, key="root", layout=layout)
    val_dir = require_dir(root / cfg.val_dir, key="root", layout=layout)
    if cfg.class_list:
        classes = read_class_list(Path(cfg.class_list).expanduser())
    else:
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{train_dir} has no class folders; expected {layout}", key="root")
    mean, std = normalization(cfg.normalize, IMAGENET_MEAN, IMAGENET_STD, weights_statistics)
    normalize = T.Normalize(mean, std)
    size = cfg.image_size
    train_steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if cfg.augment else \
        [T.Resize(int(round(size / cfg.eval_resize_ratio))), T.CenterCrop(size)]
    eval_steps = [T.Resize(int(round(size / cfg.eval_resize_ratio))), T.CenterCrop(size)]
    return DatasetSplits(
        train=ImageFileDataset(_scan(train_dir, classes, layout)),
        test=ImageFileDataset(_scan(val_dir, classes, layout)),
        class_names=read_class_names(Path(cfg.class_names).expanduser(), classes) if cfg.class_names else classes,
        channels=3,
        image_size=size,
        train_transform=T.Compose(train_steps + [T.ToTensor(), normalize]),
        eval_transform=T.Compose(eval_steps + [T.ToTensor(), normalize]),
        mean=mean,
        std=std,
        batch_augmentation=FileBatchAugmentation(size, mean, std, augment=cfg.augment,
                                                 eval_resize_ratio=cfg.eval_resize_ratio),
    )


def published_builder(name: str) -> Callable[..., DatasetSplits]:
    """The builder of a named image-folder dataset (incremental.data.options.PUBLISHED_FOLDERS)."""
    publication = PUBLISHED_FOLDERS[name]

    def build(cfg: ImageFolderConfig, weights_statistics: Statistics | None = None) -> DatasetSplits:
        return build_imagefolder(cfg, weights_statistics, publication)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = f"{publication.summary()}\n\nPublished at {publication.where}."
    return build


# build_imagenet_r, build_cub200, ...: what the registry's "incremental.data.imagefolder:build_<name>" names
for _name in PUBLISHED_FOLDERS:
    globals()[f"build_{_name}"] = published_builder(_name)
