"""Image folders on the device data path (incremental.data.jpeg): bytes read by workers, JPEGs
decoded in batches (here on the CPU; tests/test_gpu.py compares the GPU decoder), crops and
resizes with torchvision's geometry, checked against torchvision's own functions and the PIL
path, and the seeded batches independent of the number of workers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from PIL import Image

from incremental.config import RunConfig, parse_dataclass
from incremental.data import build_dataset
from incremental.data.device import resolve
from incremental.data.jpeg import FileBatchAugmentation, FileBatchLoader, decode
from incremental.protocol import build_benchmark, make_class_split
from incremental.registry import load_builtins

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

SIZES = [(40, 30), (25, 50), (33, 33), (64, 20)]  # (height, width): portrait, landscape, square, thin


def write_jpeg_folder(root, per_class: int = 4):
    """Smooth images (JPEG-friendly) of several sizes, 3 classes, train and val."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = SIZES[i % len(SIZES)]
                yy, xx = np.mgrid[0:h, 0:w]
                pixels = np.stack([(np.sin(xx / (3 + k) + rng.uniform(0, 6)) * 100 + 128) + yy for k in range(3)], -1)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i}.JPEG", quality=95)
    return root


def image_folder(tmp_path, **options):
    load_builtins()
    root = write_jpeg_folder(tmp_path / "imgs")
    cfg = parse_dataclass(RunConfig, {"dataset": {"name": "imagefolder", "root": str(root), "image_size": 16,
                                                  "normalize": "inception", **options},
                                      "protocol": {"initial_classes": 2, "increment": 1, "class_order": "sorted"}})
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    return splits, build_benchmark(splits, make_class_split(cfg.protocol, splits.num_classes, 0))


def test_eval_crops_are_torchvisions_resized_crop_and_close_to_the_pil_path(tmp_path):
    splits, benchmark = image_folder(tmp_path)
    augment = splits.batch_augmentation
    assert isinstance(augment, FileBatchAugmentation)
    data = benchmark.test_stream[0].dataset
    loader = FileBatchLoader(resolve(data), torch.device("cpu"), augment, batch_size=5, train=False, shuffle=False)
    batched = torch.cat([x for x, _, _ in loader])
    assert torch.equal(torch.cat([y for _, y, _ in loader]), torch.tensor([data[i][1] for i in range(len(data))]))
    for i, path in enumerate(loader.paths):
        image = decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        (top, left, h, w), = augment.boxes(torch.tensor([image.shape[1]]), torch.tensor([image.shape[2]]),
                                           train=False, draws=None)[0].tolist()
        # torchvision's tensor resized_crop of the same box: the same numbers
        expected = TF.resized_crop(image.float(), top, left, h, w, [16, 16], antialias=True).clamp(0, 255) / 255
        assert torch.allclose(batched[i], (expected - 0.5) / 0.5, atol=1e-5)
        # the PIL path (Resize(18) + CenterCrop(16)): the same geometry, other resampling (PIL
        # resizes the whole image, then crops; a sub-pixel shift on these 3-pixel stripes)
        pil = data.eval()[i][0]
        error = (batched[i] - pil).abs().mean()
        assert error < 0.1 and error < 0.5 * (batched[i].flip(-1) - pil).abs().mean(), (path, error)


def test_training_boxes_follow_random_resized_crop():
    augment = FileBatchAugmentation(224, (0.5,) * 3, (0.5,) * 3)
    n = 4000
    heights, widths = torch.randint(60, 500, (n,)), torch.randint(60, 500, (n,))
    torch.manual_seed(0)
    boxes, flips = augment.boxes(heights, widths, train=True, draws=augment.draw(n))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    area = (h * w).double() / (heights * widths).double()
    aspect = w.double() / h.double()
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.95 and aspect.max() <= 4 / 3 * 1.05
    assert 0.45 < flips.double().mean() < 0.55
    # the same distribution as torchvision's RandomResizedCrop.get_params
    reference = []
    for H, W in zip(heights[:1500].tolist(), widths[:1500].tolist()):
        i, j, hh, ww = RandomResizedCrop.get_params(torch.empty(3, H, W), (0.08, 1.0), (3 / 4, 4 / 3))
        reference.append((hh * ww / (H * W), math.log(ww / hh)))
    reference = torch.tensor(reference)
    assert abs(area.mean() - reference[:, 0].mean()) < 0.03
    assert abs(aspect.log().mean() - reference[:, 1].mean()) < 0.03


def test_seeded_training_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    splits, benchmark = image_folder(tmp_path)
    data = benchmark.train_stream[0].dataset
    epochs = {}
    for workers in (0, 2):
        torch.manual_seed(5)
        loader = FileBatchLoader(resolve(data), torch.device("cpu"), splits.batch_augmentation, batch_size=3,
                                 train=True, shuffle=True, num_workers=workers)
        epochs[workers] = list(loader)
        assert len(epochs[workers]) == len(loader) == math.ceil(len(data) / 3)
    for (x0, y0, _), (x2, y2, _) in zip(epochs[0], epochs[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert sorted(torch.cat([y for _, y, _ in epochs[0]]).tolist()) == sorted(data.targets)


def test_non_jpeg_files_decode_on_the_cpu(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image, = decode([read_file(str(tmp_path / "a.png"))], [str(tmp_path / "a.png")], torch.device("cpu"))
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))


def test_a_run_on_an_image_folder_trains_through_the_file_batch_loader(tmp_path):
    from incremental.distributed import SINGLE
    from incremental.run.loop import build, evaluate_experience, train_experience

    root = write_jpeg_folder(tmp_path / "imgs")
    cfg = parse_dataclass(RunConfig, {
        "dataset": {"name": "imagefolder", "root": str(root), "image_size": 16},
        "protocol": {"initial_classes": 2, "increment": 1, "class_order": "sorted", "memory": {"total": 4}},
        "backbone": {"name": "vit", "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2},
        "strategy": {"name": "replay"},
        "training": {"epochs": 1, "batch_size": 4, "data_path": "device", "num_workers": 1},
        "output": {"tensorboard": False}})
    from avalanche.core import SupervisedPlugin

    class LoaderSeen(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.loaders = []

        def before_training_epoch(self, strategy, **kwargs):
            self.loaders.append(strategy.dataloader)

    built = build(cfg, SINGLE, quiet=True, echo=print)
    seen = LoaderSeen()
    built.template.plugins.append(seen)
    train_experience(built, 0)
    train_experience(built, 1)  # new images and replayed exemplars in one loader
    assert all(isinstance(loader, FileBatchLoader) for loader in seen.loaders) and len(seen.loaders) == 2
    assert len(seen.loaders[1].paths) == 4 + 4  # 4 new images + a memory of 4
    evaluate_experience(built, 1)
    assert sum(built.recorder.total.values()) == 3 * 4
