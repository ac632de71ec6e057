"""The device data path: uint8 images gathered and augmented in batches match torchvision's
per-sample transforms, Avalanche datasets (subsets, memory concatenations) resolve to the
right base images, and runs with it train, resume and fall back for image folders."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_RUN, write_image_folder

from incremental.cli import main
from incremental.config import RunConfig, parse_dataclass
from incremental.data import build_dataset
from incremental.data.device import DeviceBatchLoader, DeviceImages, resolve
from incremental.protocol import build_benchmark, make_class_split
from incremental.registry import load_builtins


def digits(**options):
    load_builtins()
    cfg = parse_dataclass(RunConfig, {"dataset": {"name": "digits", "image_size": 16, **options},
                                      "protocol": {"initial_classes": 4, "increment": 3}})
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    class_split = make_class_split(cfg.protocol, splits.num_classes, 0)
    return splits, build_benchmark(splits, class_split)


def test_evaluation_batches_equal_the_per_sample_transform():
    splits, benchmark = digits()
    data = benchmark.test_stream[1].dataset
    resolved = resolve(data)
    loader = DeviceBatchLoader(resolved, DeviceImages("cpu"), splits.batch_augmentation, batch_size=50,
                               train=False, shuffle=False)
    batched = torch.cat([x for x, _, _ in loader])
    per_sample = torch.stack([data[i][0] for i in range(len(data))])
    assert torch.allclose(batched, per_sample, atol=1e-6)
    assert torch.equal(torch.cat([y for _, y, _ in loader]), torch.tensor([data[i][1] for i in range(len(data))]))


def test_memory_concatenations_resolve_to_their_images():
    splits, benchmark = digits()
    new = benchmark.train_stream[1].dataset
    memory = benchmark.train_stream[0].dataset.subset([5, 0, 17])
    mixed = new.concat(memory.train()).train()
    resolved = resolve(mixed)
    assert len(resolved.indices) == len(new) + 3
    images = DeviceImages("cpu").gather(resolved.slots, resolved.indices)
    as_eval = splits.batch_augmentation(images, train=False)
    expected = torch.stack([mixed.eval()[i][0] for i in range(len(mixed))])
    assert torch.allclose(as_eval, expected, atol=1e-6)


def test_training_crops_and_flips_follow_torchvision():
    """Every augmented image is one of RandomCrop's zero-padded crops (flipped or not), and
    all offsets and both flips occur."""
    augment = digits()[0].batch_augmentation
    assert augment.padding == 2 and not augment.flip  # digits: 16 px // 8, never mirrored
    flipping = type(augment)(augment.mean, augment.std, padding=2, flip=True)
    images = torch.randint(0, 256, (400, 1, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    out = flipping(images, train=True)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2)).float() / 255.0
    seen_offsets, flips = set(), set()
    for n in range(len(images)):
        raw = out[n] * 0.5 + 0.5  # undo Normalize(0.5, 0.5)
        match = None
        for dy in range(5):
            for dx in range(5):
                crop = padded[n, :, dy:dy + 16, dx:dx + 16]
                for flipped, candidate in ((False, crop), (True, crop.flip(-1))):
                    if torch.allclose(raw, candidate, atol=1e-6):
                        match = (dy, dx, flipped)
        assert match is not None, n
        seen_offsets.add(match[:2])
        flips.add(match[2])
    assert len(seen_offsets) == 25 and flips == {False, True}


def test_the_same_seed_gives_the_same_batches():
    splits, benchmark = digits()
    resolved = resolve(benchmark.train_stream[0].dataset)

    def first_batch():
        torch.manual_seed(7)
        loader = DeviceBatchLoader(resolved, DeviceImages("cpu"), splits.batch_augmentation, batch_size=32,
                                   train=True, shuffle=True)
        return next(iter(loader))

    a, b = first_batch(), first_batch()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_image_folders_resolve_to_their_files(tmp_path):
    """Image folders take the device path too, as files (incremental.data.jpeg decodes them)."""
    from incremental.data.device import _SOURCES
    from incremental.data.imagefolder import ImageFileDataset
    from incremental.data.jpeg import FileBatchAugmentation

    root = write_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    load_builtins()
    cfg = parse_dataclass(RunConfig, {"dataset": {"name": "imagefolder", "root": str(root), "image_size": 16},
                                      "protocol": {"increment": 1, "class_order": "sorted"}})
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    benchmark = build_benchmark(splits, make_class_split(cfg.protocol, splits.num_classes, 0))
    assert isinstance(splits.batch_augmentation, FileBatchAugmentation)
    resolved = resolve(benchmark.train_stream[1].dataset)
    assert all(isinstance(_SOURCES[int(s)](), ImageFileDataset) for s in resolved.slots)
    files = [splits.train.samples[int(i)][0] for i in resolved.indices]
    assert all("/train/b/" in f for f in files) and len(files) == 2


@pytest.mark.parametrize("strategy", ["replay", "der"])
def test_a_run_on_the_device_path_trains_like_the_loader(tmp_path, strategy):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    results = {}
    for path in ("loader", "device"):
        assert main(["run", str(config), "--out", str(tmp_path / path), "--quiet", "--set", f"strategy={strategy}",
                     "--set", f"training.data_path={path}", "--set", "output.tensorboard=false"]) == 0
        results[path] = json.loads((tmp_path / path / "metrics.json").read_text())
    loader, device = results["loader"], results["device"]
    assert device["train_samples"] == loader["train_samples"]  # memory included the same way
    assert device["train_loss"] != loader["train_loss"]  # another augmentation stream...
    assert device["average_incremental_accuracy"] == pytest.approx(loader["average_incremental_accuracy"], abs=12)


def test_a_plugins_own_loop_gets_seeded_device_batches_without_touching_the_training_stream():
    """TrainingEngine.batches (ViTIL's balanced finetuning, MAE): on the device path, epochs of
    augmented batches from their own seeded stream; the global generator is left as it was."""
    from incremental.training.engine import SeededEpochs
    from incremental.training.template import IncrementalTemplate

    splits, benchmark = digits()
    data = benchmark.train_stream[0].dataset.subset(range(40))
    model = torch.nn.Linear(4, 2)
    template = IncrementalTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   batch_augmentation=splits.batch_augmentation, device="cpu")

    def two_epochs(seed):
        batches = template.engine.batches(data, batch_size=16, shuffle=True, drop_last=True, seed=seed)
        assert isinstance(batches, SeededEpochs) and len(batches) == 2
        return [torch.cat([x.flatten() for x, _, _ in batches]) for _ in range(2)]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again, other = two_epochs(7), two_epochs(7), two_epochs(8)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is untouched
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # seeded
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])  # a new draw per epoch
    plain = IncrementalTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    assert isinstance(plain.engine.batches(data, batch_size=16, shuffle=True, drop_last=True, seed=7),
                      torch.utils.data.DataLoader)  # the loader path keeps the DataLoader
