"""Small-image datasets held on the training device as uint8, augmented there in batches.

A DataLoader over an in-memory dataset spends its time in Python, per sample: indexing, the
random crop and flip, the float conversion. For digits and CIFAR on a GPU that, not the model,
limits throughput. Here the images of each ``TensorImageDataset`` are copied to the device once
(uint8: CIFAR-100's 60,000 images take 184 MB), and every batch is gathered, randomly cropped
with padding, flipped and normalised there in a few tensor operations.

Avalanche's datasets (subsets, concatenations with the exemplar memory, train/eval transform
groups) are kept as they are: once per experience, :func:`resolve` reads which base images a
dataset holds, with the transforms switched off and the base datasets answering with their
own positions, and :class:`DeviceBatchLoader` then iterates over those positions. The random
crops follow torchvision's ``RandomCrop(size, padding)`` (zero padding, offsets uniform in
[0, 2 * padding]) and ``RandomHorizontalFlip``; the random numbers come from torch's global
generator, so ``seed`` fixes them (a different stream from the per-sample path's, so the two
paths give different, equally seeded runs).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class BatchAugmentation:
    """What the per-sample tensor transforms do, for whole batches."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0  # random crop with this zero padding (0: no crop)
    flip: bool = False

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crop offsets (2, n) and flips (n,) for ``n`` images, from torch's global CPU
        generator (so ``seed`` fixes them, and ranks drawing for one global batch agree)."""
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n)) if self.padding else torch.zeros(2, n, dtype=torch.long)
        mirror = torch.rand(n) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return offsets, mirror

    def __call__(self, images: torch.Tensor, *, train: bool,
                 draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 (N, C, H, W) on any device -> normalised float32; random crop and flip if
        ``train``, with ``draws`` from :meth:`draw` (drawn here when not given)."""
        x = images
        n, c, h, w = x.shape
        if train and (self.padding or self.flip):
            offsets, mirror = draws if draws is not None else self.draw(n)
        if train and self.padding:
            p = self.padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            offsets = offsets.to(x.device)
            rows = offsets[0][:, None] + torch.arange(h, device=x.device)[None, :]
            cols = offsets[1][:, None] + torch.arange(w, device=x.device)[None, :]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            channel = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        if train and self.flip:
            mirror = mirror.to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------- sources

_SOURCES: list[weakref.ref] = []  # every TensorImageDataset, by slot
_ANSWER_POSITIONS = False


def register_source(dataset: Any) -> int:
    """A slot for a TensorImageDataset (called by its constructor)."""
    _SOURCES.append(weakref.ref(dataset))
    return len(_SOURCES) - 1


def answering_positions() -> bool:
    return _ANSWER_POSITIONS


@contextlib.contextmanager
def _positions() -> Iterator[None]:
    global _ANSWER_POSITIONS
    _ANSWER_POSITIONS = True
    try:
        yield
    finally:
        _ANSWER_POSITIONS = False


@dataclass
class ResolvedData:
    """Where each sample of an Avalanche dataset lives: (source slot, index), label, task."""

    slots: torch.Tensor
    indices: torch.Tensor
    targets: torch.Tensor
    tasks: torch.Tensor


def resolve(dataset: Any) -> ResolvedData | None:
    """The base images behind an Avalanche dataset, or None when some sample does not come
    from a TensorImageDataset (an image folder): that dataset takes the DataLoader path."""
    plain = dataset.remove_current_transform_group()
    slots, indices, targets, tasks = [], [], [], []
    with _positions():
        for i in range(len(plain)):
            x, y, *rest = plain[i]
            if not (torch.is_tensor(x) and x.dtype == torch.int64 and x.shape == (2,)):
                return None
            slots.append(int(x[0]))
            indices.append(int(x[1]))
            targets.append(int(y))
            tasks.append(int(rest[0]) if rest else 0)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return ResolvedData(as_long(slots), as_long(indices), as_long(targets), as_long(tasks))


class DeviceImages:
    """uint8 copies of the source datasets on one device, made on first use."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._images: dict[int, torch.Tensor] = {}

    def get(self, slot: int) -> torch.Tensor:
        if slot not in self._images:
            source = _SOURCES[slot]()
            if source is None:
                raise RuntimeError("a dataset was freed while its images were in use")
            self._images[slot] = source.images.to(self.device)
        return self._images[slot]

    def gather(self, slots: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        unique = slots.unique().tolist()
        if len(unique) == 1:
            return self.get(unique[0])[indices.to(self.device)]
        first = self.get(unique[0])
        out = torch.empty((len(indices), *first.shape[1:]), dtype=first.dtype, device=self.device)
        for slot in unique:
            where = (slots == slot).nonzero().squeeze(1)
            out[where.to(self.device)] = self.get(slot)[indices[where].to(self.device)]
        return out


class DeviceBatchLoader:
    """Batches ``[x, y, t]`` of a resolved dataset, made on the device; iterable like a
    DataLoader (``len`` is the number of batches)."""

    def __init__(self, data: ResolvedData, images: DeviceImages, augmentation: BatchAugmentation, *,
                 batch_size: int, train: bool, shuffle: bool, drop_last: bool = False, dataset: Any = None,
                 dist: Any = None):
        """Under torchrun (``dist``, a DistInfo) each global batch of ``batch_size`` is split and
        this rank gets its shard; shuffles and augmentation draws are made for the global batch."""
        from ..distributed import SINGLE, GlobalBatches

        self.data = data
        self.images = images
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.train = train
        self.batches = GlobalBatches(len(data.indices), batch_size, dist or SINGLE, train=train, shuffle=shuffle,
                                     drop_last=drop_last)
        self.dataset = dataset  # the Avalanche dataset, for code that looks at loader.dataset
        self.num_workers = 0
        device = images.device
        self._targets = data.targets.to(device)
        self._tasks = data.tasks.to(device)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for batch, shard in self.batches:
            draws = self.augmentation.draw(len(batch)) if self.train else None  # for the whole global batch
            chosen = batch[shard]
            draws = (draws[0][:, shard], draws[1][shard]) if draws is not None else None
            if not len(chosen):  # evaluation only: a last batch smaller than the world
                continue
            images = self.images.gather(self.data.slots[chosen], self.data.indices[chosen])
            on_device = chosen.to(self.images.device)
            yield [self.augmentation(images, train=self.train, draws=draws), self._targets[on_device],
                   self._tasks[on_device]]
