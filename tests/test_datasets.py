"""Each loader on files written here in the real formats; clear errors on bad folders."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import write_cifar100, write_image_folder

from incremental.config import parse_dataclass
from incremental.data import build_dataset
from incremental.data.cifar import Cifar100Config
from incremental.data.digits import DigitsConfig
from incremental.data.imagefolder import ImageFolderConfig
from incremental.data.synthetic import SyntheticConfig
from incremental.errors import DataError


def test_digits_is_the_real_bundled_data():
    data = build_dataset("digits", DigitsConfig(image_size=24))
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    image, label = data.train[0]
    assert image.shape == (1, 24, 24) and image.dtype == torch.uint8 and 0 <= label < 10
    assert sorted(set(data.test.targets)) == list(range(10))
    again = build_dataset("digits", DigitsConfig(image_size=24))
    assert torch.equal(again.test.images, data.test.images)  # the split does not depend on any run seed


def test_synthetic_is_deterministic_and_learnable_in_principle():
    cfg = SyntheticConfig(num_classes=100, train_per_class=4, test_per_class=2, image_size=8, noise=0.1)
    a, b = build_dataset("synthetic", cfg), build_dataset("synthetic", cfg)
    assert a.num_classes == 100 and len(a.train) == 400 and len(a.test) == 200
    assert torch.equal(a.train.images, b.train.images)
    # nearest class mean on raw pixels is far above chance (1%): the classes are distinct
    x = a.train.images.float().flatten(1)
    means = torch.stack([x[torch.tensor(a.train.targets) == c].mean(0) for c in range(100)])
    pred = torch.cdist(a.test.images.float().flatten(1), means).argmin(1)
    assert (pred == torch.tensor(a.test.targets)).float().mean() > 0.5


def test_cifar100_reads_the_standard_folder(tmp_path):
    folder = write_cifar100(tmp_path)
    for root in (folder, tmp_path):  # the folder itself or its parent
        data = build_dataset("cifar100", Cifar100Config(root=str(root)))
        assert len(data.train) == 200 and len(data.test) == 100 and data.class_names[3] == "class3"
    with (folder / "train").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    image, label = data.train[5]
    expected = torch.from_numpy(raw[b"data"][5].reshape(3, 32, 32))
    assert torch.equal(image, expected) and label == 5
    assert data.train_transform(image).shape == (3, 32, 32)
    resized = build_dataset("cifar100", Cifar100Config(root=str(folder), image_size=64))
    assert resized.train[0][0].shape == (3, 64, 64)


def test_normalize_chooses_the_pretrained_models_statistics(tmp_path):
    """none: PILOT's [0, 1] pixels; inception: (x - 0.5) / 0.5, what augreg/in21k ViTs expect;
    dataset: CIFAR-100's own statistics. The device data path uses the same numbers."""
    folder = write_cifar100(tmp_path)
    raw = build_dataset("cifar100", Cifar100Config(root=str(folder))).test[0][0].float() / 255
    for choice, expected in (("none", raw), ("inception", (raw - 0.5) / 0.5),
                             ("dataset", (raw - torch.tensor([0.5071, 0.4865, 0.4409]).view(3, 1, 1))
                              / torch.tensor([0.2673, 0.2564, 0.2762]).view(3, 1, 1))):
        data = build_dataset("cifar100", Cifar100Config(root=str(folder), normalize=choice, augment=False))
        assert torch.allclose(data.eval_transform(data.test[0][0]), expected, atol=1e-5), choice
    root = write_image_folder(tmp_path / "imnet")
    data = build_dataset("imagefolder", ImageFolderConfig(root=str(root), image_size=16, normalize="inception"))
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.5, 0.5, 0.5)
    assert -1.0 <= float(data.eval_transform(data.test[0][0]).min()) < 0


def test_cifar100_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected the cifar-100-python folder") as info:
        build_dataset("cifar100", Cifar100Config(root=str(tmp_path / "nowhere")))
    assert info.value.key == "dataset.root"
    folder = write_cifar100(tmp_path / "a")
    (folder / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="is not a CIFAR-100 pickle"):
        build_dataset("cifar100", Cifar100Config(root=str(folder)))
    (folder / "test").unlink()
    with pytest.raises(DataError, match="test is missing"):
        build_dataset("cifar100", Cifar100Config(root=str(folder)))


def test_cifar100_refuses_pickles_that_run_code(tmp_path):
    folder = write_cifar100(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with (folder / "train").open("wb") as f:
        pickle.dump({b"data": Exploit()}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        build_dataset("cifar100", Cifar100Config(root=str(folder)))


def test_cifar100_and_imagefolder_require_a_root():
    with pytest.raises(DataError, match="not set: pass --set dataset.root=") as info:
        build_dataset("cifar100", parse_dataclass(Cifar100Config, {}))
    assert info.value.key == "dataset.root"
    with pytest.raises(DataError, match="not set: pass --set dataset.root="):
        build_dataset("imagefolder", parse_dataclass(ImageFolderConfig, {}))


def test_imagefolder_reads_train_and_val(tmp_path):
    root = write_image_folder(tmp_path / "imnet")
    data = build_dataset("imagefolder", ImageFolderConfig(root=str(root), image_size=16))
    assert data.class_names == ["n01", "n02", "n03"] and len(data.train) == 9 and len(data.test) == 9
    image, label = data.train[4]
    assert label == 1 and data.train_transform(image).shape == (3, 16, 16)
    assert data.eval_transform(image).shape == (3, 16, 16)


def test_imagefolder_class_list_selects_and_orders_a_subset(tmp_path):
    root = write_image_folder(tmp_path / "imnet")
    listing = tmp_path / "subset.txt"
    listing.write_text("# ImageNet-2 :)\nn03\n\nn01 extra-column\n")
    data = build_dataset("imagefolder", ImageFolderConfig(root=str(root), class_list=str(listing), image_size=16))
    assert data.class_names == ["n03", "n01"] and sorted(set(data.train.targets)) == [0, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; expected ROOT/train/<class>/<image>"):
        build_dataset("imagefolder", ImageFolderConfig(root=str(tmp_path / "nope")))
    root = write_image_folder(tmp_path / "imnet")
    listing = tmp_path / "subset.txt"
    listing.write_text("n01\nn09\n")
    with pytest.raises(DataError, match="n09 is missing"):
        build_dataset("imagefolder", ImageFolderConfig(root=str(root), class_list=str(listing)))
    for f in (root / "val" / "n02").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="holds no images"):
        build_dataset("imagefolder", ImageFolderConfig(root=str(root)))
    (root / "val" / "n02" / "broken.png").write_bytes(b"\x89PNG garbage")
    data = build_dataset("imagefolder", ImageFolderConfig(root=str(root)))
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        data.test[[p for p, _ in data.test.samples].index(str(root / "val" / "n02" / "broken.png"))]
