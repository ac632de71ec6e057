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
    resize: int | None = None  # then bilinear to this size (images kept small, used large: CIFAR at 224 px)

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
        mean, std = _constants(self.mean, self.std, x.device)
        x = x.float() / 255.0
        if self.resize is not None and self.resize != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return (x - mean) / std


_CONSTANTS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(mean: tuple[float, ...], std: tuple[float, ...],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation tensors on ``device``, made once: a host-to-device copy per batch
    would make the CPU wait for the GPU's queue every step."""
    key = (mean, std, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.tensor(mean, device=device).view(1, -1, 1, 1),
                           torch.tensor(std, device=device).view(1, -1, 1, 1))
    return _CONSTANTS[key]


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


def stored_images(dataset: Any) -> torch.Tensor | None:
    """The uint8 images (N, C, H, W) an Avalanche dataset holds, as stored (no transform), in its
    order; None when some sample does not come from a TensorImageDataset (an image folder)."""
    resolved = resolve(dataset)
    if resolved is None:
        return None
    if not len(resolved.slots):
        return torch.empty(0, dtype=torch.uint8)
    first = _SOURCES[int(resolved.slots[0])]()
    out = torch.empty((len(resolved.slots), *first.images.shape[1:]), dtype=torch.uint8)
    for slot in resolved.slots.unique().tolist():
        rows = (resolved.slots == slot).nonzero().flatten()
        out[rows] = _SOURCES[slot]().images[resolved.indices[rows]]
    return out


class DeviceImages:
    """uint8 copies of the source datasets on one device, in one tensor (so a batch drawing
    from several sources, new data and replayed memory, is one gather), made on first use."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.images: torch.Tensor | None = None
        self._start: dict[int, int] = {}  # slot -> its first row in ``images``

    def positions(self, slots: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows of ``images`` holding these (slot, index) samples (CPU), copying new sources over."""
        for slot in slots.unique().tolist():
            if slot not in self._start:
                source = _SOURCES[slot]()
                if source is None:
                    raise RuntimeError("a dataset was freed while its images were in use")
                added = source.images.to(self.device)
                self._start[slot] = 0 if self.images is None else len(self.images)
                self.images = added if self.images is None else torch.cat([self.images, added])
        starts = torch.zeros(max(self._start) + 1, dtype=torch.long)
        for slot, start in self._start.items():
            starts[slot] = start
        return starts[slots] + indices

    def gather(self, slots: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 images of these (slot, index) samples, on the device."""
        return self.images_at(self.positions(slots, indices))

    def images_at(self, rows: torch.Tensor) -> torch.Tensor:
        assert self.images is not None
        return self.images[rows.to(self.device)]


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
        # The epoch's sample positions and augmentation draws go to the device in one copy each;
        # a few small copies per batch would each make the CPU wait for the GPU's queue. The
        # random numbers are drawn in the same order as batch by batch (shuffle, then per batch
        # crops and flips for the whole global batch), so the results are those of that order.
        planned = []
        for batch, shard in self.batches:
            draws = self.augmentation.draw(len(batch)) if self.train else None  # for the whole global batch
            chosen = batch[shard]
            if len(chosen):  # empty: evaluation only, a last batch smaller than the world
                planned.append((chosen, (draws[0][:, shard], draws[1][shard]) if draws is not None else None))
        if not planned:
            return
        device = self.images.device
        chosen = torch.cat([c for c, _ in planned])
        rows = _to_device(self.images.positions(self.data.slots[chosen], self.data.indices[chosen]), device)
        chosen = _to_device(chosen, device)
        if self.train:
            offsets = _to_device(torch.cat([d[0] for _, d in planned], dim=1), device)
            mirror = _to_device(torch.cat([d[1] for _, d in planned]), device)
        start = 0
        for batch_chosen, _ in planned:
            end = start + len(batch_chosen)
            draws = (offsets[:, start:end], mirror[start:end]) if self.train else None
            images = self.images.images[rows[start:end]]
            yield [self.augmentation(images, train=self.train, draws=draws), self._targets[chosen[start:end]],
                   self._tasks[chosen[start:end]]]
            start = end


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``, asynchronously from pinned memory on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
