"""Image folders on the device data path: worker processes read the files' bytes, JPEGs are
decoded in batches on the GPU (nvJPEG through ``torchvision.io.decode_jpeg(..., device="cuda")``)
and cropped, resized, flipped and normalised there.

A PIL DataLoader spends its time decoding and resizing on the CPU, per image; at 224 px a
ViT-S on one GPU needs more of that than most machines' cores give. Here the CPU only reads
bytes. The geometry follows torchvision's tensor transforms: training takes
``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`` boxes (torchvision's ten-attempt
sampling, then its central fallback) and a horizontal flip; evaluation resizes the shorter side
to ``size / eval_resize_ratio`` and takes the central ``size`` crop, as one box. Each box is
resized with antialiased bilinear interpolation (``F.interpolate(antialias=True)``, what
torchvision's tensor ``resized_crop`` does), so images differ from the PIL path's by
resampling rounding, not by geometry. Without a GPU the same code decodes on the CPU; GPU and
CPU decoders may differ by a grey level in a few pixels (their IDCTs differ), nothing else.
Files that are not JPEGs (PNG, ...) are decoded on the CPU by ``decode_image``.

The random numbers are drawn from torch's global generator when the epoch is planned, so
``seed`` fixes them whatever the number of workers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..errors import DataError
from .device import ResolvedData, _constants, _SOURCES

ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


@dataclass(frozen=True)
class FileBatchAugmentation:
    """What image folders' per-sample PIL transforms do, for decoded batches on the device."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = True  # RandomResizedCrop and flip in training; else the evaluation crop
    eval_resize_ratio: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def draw(self, n: int) -> torch.Tensor:
        """Uniform numbers for ``n`` images' crops and flips: (n, 4 * ATTEMPTS + 1), from torch's
        global generator (area, log-ratio, top and left per attempt; the flip)."""
        return torch.rand(n, 4 * ATTEMPTS + 1)

    def boxes(self, heights: torch.Tensor, widths: torch.Tensor, *, train: bool,
              draws: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(top, left, height, width) per image (long, (n, 4)) and flips (bool, (n,))."""
        h, w = heights.double(), widths.double()
        n = len(h)
        if not (train and self.augment):
            # Resize(round(size / ratio)) of the shorter side, then CenterCrop(size): in the
            # original image, the central square of side short * size / round(size / ratio)
            short = torch.minimum(h, w)
            side = (short * self.size / round(self.size / self.eval_resize_ratio)).round().clamp(min=1)
            ch, cw = torch.minimum(side, h), torch.minimum(side, w)
            top, left = ((h - ch) / 2).round(), ((w - cw) / 2).round()
            return torch.stack([top, left, ch, cw], 1).long(), torch.zeros(n, dtype=torch.bool)
        assert draws is not None
        u = draws.double()
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        chosen = torch.zeros(n, 4, dtype=torch.double)
        found = torch.zeros(n, dtype=torch.bool)
        for attempt in range(ATTEMPTS):
            a, r, t, l_ = (u[:, 4 * attempt + k] for k in range(4))
            target = area * (self.scale[0] + a * (self.scale[1] - self.scale[0]))
            aspect = torch.exp(log_lo + r * (log_hi - log_lo))
            cw = torch.sqrt(target * aspect).round()
            ch = torch.sqrt(target / aspect).round()
            ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h) & ~found
            top = torch.floor(t * (h - ch + 1)).clamp(max=h - ch)
            left = torch.floor(l_ * (w - cw + 1)).clamp(max=w - cw)
            chosen[ok] = torch.stack([top, left, ch, cw], 1)[ok]
            found |= ok
        if not found.all():  # torchvision's fallback: the central crop, its ratio clamped
            rest = ~found
            hr, wr = h[rest], w[rest]
            in_ratio = wr / hr
            cw = torch.where(in_ratio > self.ratio[1], (hr * self.ratio[1]).round(), wr)
            ch = torch.where(in_ratio < self.ratio[0], (wr / self.ratio[0]).round(), hr)
            chosen[rest] = torch.stack([((hr - ch) / 2).round(), ((wr - cw) / 2).round(), ch, cw], 1)
        return chosen.long(), u[:, -1] < 0.5

    def __call__(self, images: list[torch.Tensor], *, train: bool, draws: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded uint8 (3, H, W) images (any sizes, on one device) -> normalised float32
        (N, 3, size, size)."""
        device = images[0].device
        heights = torch.tensor([im.shape[-2] for im in images])
        widths = torch.tensor([im.shape[-1] for im in images])
        boxes, flips = self.boxes(heights, widths, train=train, draws=draws)
        out = torch.empty(len(images), 3, self.size, self.size, device=device)
        for i, (image, (top, left, height, width)) in enumerate(zip(images, boxes.tolist())):
            crop = image[:, top:top + height, left:left + width].unsqueeze(0).float()
            out[i] = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                                     align_corners=False, antialias=True)[0]
        out = out.clamp_(0, 255).div_(255.0)
        if flips.any():
            mirror = flips.to(device)
            out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
        mean, std = _constants(self.mean, self.std, device)
        return (out - mean) / std


class FileBytes(torch.utils.data.Dataset):
    """The raw bytes of image files (for DataLoader workers): (uint8 tensor, position)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Plain file reads: importing torchvision.io in a forked worker can hang on its
        # extension's load, and a worker needs nothing but the bytes.
        try:
            with open(self.paths[index], "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), index
        except OSError as exc:
            raise DataError(f"cannot read image {self.paths[index]}: {exc.strerror}", key="dataset.root") from None


def _as_list(batch: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
    return batch


def decode(data: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 images from file bytes: JPEGs in one batched call on ``device`` (nvJPEG on CUDA),
    other formats on the CPU. A file that does not decode is a DataError naming it."""
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its decoders are what we use
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    is_jpeg = [len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in data]
    images: list[Any] = [None] * len(data)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB,
                                  device=device if device.type == "cuda" else "cpu")
        except RuntimeError:  # one bad file fails the batch: find it
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(data[i], mode=ImageReadMode.RGB))
                except RuntimeError as exc:
                    raise DataError(f"cannot read image {paths[i]}: {exc}", key="dataset.root") from None
        for i, image in zip(jpegs, decoded):
            images[i] = image.to(device)
    for i, j in enumerate(is_jpeg):
        if not j:
            try:
                images[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device)
            except RuntimeError as exc:
                raise DataError(f"cannot read image {paths[i]}: {exc}", key="dataset.root") from None
    return images


class FileBatchLoader:
    """Batches ``[x, y, t]`` of a resolved image-folder dataset: bytes read by ``num_workers``
    processes, decoded and augmented on the device; iterable like a DataLoader."""

    def __init__(self, data: ResolvedData, device: torch.device, augmentation: FileBatchAugmentation, *,
                 batch_size: int, train: bool, shuffle: bool, drop_last: bool = False, dataset: Any = None,
                 dist: Any = None, num_workers: int = 0):
        from ..distributed import SINGLE, GlobalBatches

        self.data, self.device, self.augmentation = data, torch.device(device), augmentation
        self.train, self.num_workers, self.dataset = train, num_workers, dataset
        self.batches = GlobalBatches(len(data.indices), batch_size, dist or SINGLE, train=train, shuffle=shuffle,
                                     drop_last=drop_last)
        self.paths = [_SOURCES[int(slot)]().samples[int(index)][0] for slot, index in zip(data.slots, data.indices)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        from torch.utils.data import DataLoader

        planned, draws = [], []
        for batch, shard in self.batches:  # random numbers in the same order on every rank
            drawn = self.augmentation.draw(len(batch)) if self.train else None
            chosen = batch[shard]
            if len(chosen):
                planned.append(chosen.tolist())
                draws.append(drawn[shard] if drawn is not None else None)
        if not planned:
            return
        cuda = self.device.type == "cuda"
        reader = DataLoader(FileBytes(self.paths), batch_sampler=planned, num_workers=self.num_workers,
                            collate_fn=_as_list, pin_memory=False,
                            prefetch_factor=4 if self.num_workers else None)
        for (batch, positions), drawn in zip(((list(b), [p for _, p in b]) for b in reader), draws):
            images = decode([data for data, _ in batch], [self.paths[p] for p in positions], self.device)
            x = self.augmentation(images, train=self.train, draws=drawn)
            where = torch.tensor(positions)
            y, t = self.data.targets[where], self.data.tasks[where]
            yield [x, y.to(self.device, non_blocking=cuda), t.to(self.device, non_blocking=cuda)]
