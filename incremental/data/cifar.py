"""CIFAR-100 from the standard ``cifar-100-python`` folder (train, test, meta pickles)."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import torch

from .options import Cifar100Config
from ..errors import DataError, first_line
from .base import (DatasetSplits, Statistics, TensorImageDataset, class_names, integer_labels, normalization, pixels_uint8,
                   require_dir, resize_uint8, root_folder, tensor_transforms)

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
LAYOUT = "the cifar-100-python folder (or its parent) holding the files train, test and meta"


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the CIFAR files are pickles, and
    a pickle from elsewhere must not be able to run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path} is missing; expected {LAYOUT}", key="root")
    try:
        with path.open("rb") as f:
            data = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DataError(f"{path} is not a CIFAR-100 pickle ({type(exc).__name__}: {exc})", key="root") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a CIFAR-100 pickle (no dictionary inside)", key="root")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _images_and_labels(path: Path) -> tuple[torch.Tensor, list[int]]:
    batch = _load_pickle(path)
    if "data" not in batch or "fine_labels" not in batch:
        raise DataError(f"{path} lacks 'data' or 'fine_labels'; is it CIFAR-10 or another file?", key="root")
    data = pixels_uint8(batch["data"], source=path, field="data")
    labels = integer_labels(batch["fine_labels"], source=path, field="fine_labels", num_classes=100)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} "
                        f"and {len(labels)}", key="root")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def find_cifar_folder(root: Path) -> Path:
    require_dir(root, key="root", layout=LAYOUT + " (download: true fetches it)")
    if (root / "cifar-100-python").is_dir():
        return root / "cifar-100-python"
    return root


def download_cifar100(root: Path, url: str, md5: str) -> None:
    """The archive into ``root`` (one already there whose md5 matches is reused), its md5
    checked, then unpacked: through torchvision's downloader over HTTP(S); a ``file://`` URL (a
    mirror on a shared disk, which torchvision's downloader cannot read) is copied, then checked
    and unpacked by torchvision's own functions. A corrupt archive is removed and refused."""
    from urllib.error import URLError

    from torchvision.datasets.utils import calculate_md5, check_integrity, download_and_extract_archive, extract_archive

    archive = root / Path(url.rstrip("/")).name
    try:
        root.mkdir(parents=True, exist_ok=True)
        if url.startswith("file://"):
            copy_file_url(url, archive, md5)
            if not check_integrity(str(archive), md5):
                raise RuntimeError("File not found or corrupted.")
            extract_archive(str(archive), str(root))
        else:
            download_and_extract_archive(url, str(root), filename=archive.name, md5=md5)
    except RuntimeError as exc:  # torchvision's "File not found or corrupted." after its md5 check
        if not archive.is_file():
            raise DataError(f"cannot download {url}: {str(exc).strip()[:200]}", key="url") from None
        actual = calculate_md5(str(archive))
        archive.unlink()
        raise DataError(f"{url} gave an archive whose md5 is {actual}, not {md5}: corrupt or another file; "
                        f"it was removed", key="md5") from None
    except (URLError, OSError, ValueError, tarfile.TarError) as exc:  # unreachable, refused, not an archive
        reason = first_line(getattr(exc, "reason", "") or exc, type(exc).__name__)
        raise DataError(f"cannot download or unpack {url} into {root}: {reason[:200]}", key="url") from None


def copy_file_url(url: str, archive: Path, md5: str) -> None:
    """``file://`` ``url``'s file to ``archive``, unless the copy there already has ``md5``."""
    import shutil
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from torchvision.datasets.utils import check_integrity

    if archive.is_file() and check_integrity(str(archive), md5):
        return
    shutil.copyfile(url2pathname(urlparse(url).path), archive)


def build_cifar100(cfg: Cifar100Config, weights_statistics: Statistics | None = None) -> DatasetSplits:
    """CIFAR-100 (50000 train / 10000 test, 32x32): a cifar-100-python folder, or download: true."""
    root = root_folder(cfg.root, example="/path/to/cifar-100-python")
    if cfg.download and not (root / "cifar-100-python").is_dir() and not (root / "meta").is_file():
        download_cifar100(root, cfg.url, cfg.md5)
    folder = find_cifar_folder(root)
    train_images, train_labels = _images_and_labels(folder / "train")
    test_images, test_labels = _images_and_labels(folder / "test")
    meta = _load_pickle(folder / "meta")
    names = class_names(meta.get("fine_label_names", []), source=folder / "meta", field="fine_label_names")
    if len(names) != 100:
        raise DataError(f"{folder / 'meta'}: expected 100 fine_label_names, got {len(names)}", key="root")
    # Up to 64 px the images are resized once at load time; above (224 px for pre-trained ViTs)
    # they stay 32 px in memory (184 MB rather than 9 GB) and each batch is resized on its way.
    stored = cfg.image_size if cfg.image_size <= 64 else 32
    mean, std = normalization(cfg.normalize, CIFAR100_MEAN, CIFAR100_STD, weights_statistics)
    train_tf, eval_tf, batch_augmentation = tensor_transforms(stored, mean, std,
                                                              augment=cfg.augment, flip=True, resize=cfg.image_size)
    return DatasetSplits(
        train=TensorImageDataset(resize_uint8(train_images, stored), train_labels),
        test=TensorImageDataset(resize_uint8(test_images, stored), test_labels),
        class_names=names,
        channels=3,
        image_size=cfg.image_size,
        train_transform=train_tf,
        eval_transform=eval_tf,
        batch_augmentation=batch_augmentation,
        mean=mean,
        std=std,
    )
