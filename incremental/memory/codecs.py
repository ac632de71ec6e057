"""Exemplar codecs: how a byte-budgeted memory stores one class's exemplars.

A codec turns a class's ranked exemplars (uint8, best first) and a byte budget into a payload,
a dict of tensors that is exactly what the memory keeps: its size is ``payload_bytes``, the sum
of the tensors' ``nbytes``, and the checkpoint stores those tensors. Each codec keeps the
longest prefix of the ranking that fits, so herding decides which exemplars survive, and can
shrink a payload to a smaller budget when later classes take their share.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Protocol

import torch

Payload = dict[str, torch.Tensor]


def payload_bytes(payload: Payload) -> int:
    """The bytes a payload occupies: every tensor it holds, nothing else."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def psnr_db(decoded: torch.Tensor, original: torch.Tensor) -> float | None:
    """PSNR in dB of uint8 images against the originals over the whole set (None: identical)."""
    mse = (decoded.float() - original.float()).pow(2).mean().item()
    return None if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


class ExemplarCodec(Protocol):
    def encode(self, images: torch.Tensor, budget: int, *, seed: int) -> Payload | None:
        """The longest prefix of ``images`` (uint8 (n, C, H, W), best first) that fits in
        ``budget`` bytes, as a payload; None when not even one exemplar fits."""

    def shrink(self, payload: Payload, budget: int, *, seed: int) -> Payload | None:
        """``payload`` re-stored within ``budget`` bytes, from what it holds (never the originals)."""

    def decode(self, payload: Payload) -> torch.Tensor:
        """The exemplars as uint8 (n, C, H, W), in ranking order."""

    def count(self, payload: Payload) -> int:
        """How many exemplars the payload holds."""

    def smallest_exemplar(self, images: torch.Tensor) -> int:
        """The bytes of the smallest payload that holds one of ``images`` (a sample of the dataset)."""


def store_classes(codec: ExemplarCodec, budget: int, shrink: list[tuple[Payload, int]],
                  encode: list[tuple[torch.Tensor, int]]) -> tuple[list[Payload | None], list[Payload | None]]:
    """Shrink the stored classes ``(payload, seed)`` and encode the new ones ``(images, seed)``,
    all to ``budget`` bytes each: in one batch where the codec has ``store_many`` (NeRV fits all
    its networks together), else one class at a time."""
    many = getattr(codec, "store_many", None)
    if callable(many):
        return many(budget, shrink, encode)
    return ([codec.shrink(payload, budget, seed=seed) for payload, seed in shrink],
            [codec.encode(images, budget, seed=seed) for images, seed in encode])


def fitted_downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` x ``size`` uint8 images whose bilinear upsampling back to the originals' size
    (the dataset's own ``resize_uint8``, which :meth:`RawCodec.decode` applies) is nearest the
    originals in least squares: the pseudo-inverse of the upsampling, per axis. An image that was
    itself upsampled bilinearly from ``size`` pixels (the digits) comes back to its source pixels
    up to rounding, where an antialiased resize down would blur it (21 dB on digits)."""
    def inverse(rows: int, columns: int) -> torch.Tensor:
        basis = torch.eye(rows, dtype=torch.float64).unsqueeze(1)  # each small pixel alone
        upsampling = torch.nn.functional.interpolate(basis, size=columns, mode="linear", align_corners=False)[:, 0]
        return torch.linalg.pinv(upsampling.T)  # (rows, columns)

    height, width = images.shape[-2:]
    fitted = inverse(size, height) @ images.double() @ inverse(size, width).T
    return fitted.round().clamp(0, 255).to(torch.uint8)


class RawCodec:
    """uint8 pixels: n * C * H * W bytes as the dataset stores them, or n * C * size * size
    resized to ``size`` (with the original height and width, 4 bytes, to resize them back)."""

    def __init__(self, config: Any = None):
        self.config = config
        self.size = getattr(config, "size", None)

    def _resizes(self, images: torch.Tensor) -> bool:
        return self.size is not None and tuple(images.shape[-2:]) != (self.size, self.size)

    def encode(self, images: torch.Tensor, budget: int, *, seed: int) -> Payload | None:
        if not len(images) or not self._resizes(images):
            return self._prefix(images, budget, {})
        shape = _shape_header(images)
        return self._prefix(fitted_downsample(images, self.size), budget - payload_bytes(shape), shape)

    @staticmethod
    def _prefix(pixels: torch.Tensor, budget: int, extra: Payload) -> Payload | None:
        per_image = pixels[0].numel() if len(pixels) else 1
        n = min(len(pixels), max(0, budget) // per_image)
        return {"pixels": pixels[:n].clone(), **extra} if n else None

    def shrink(self, payload: Payload, budget: int, *, seed: int) -> Payload | None:
        extra = {k: v for k, v in payload.items() if k != "pixels"}  # the stored pixels, never resized again
        return self._prefix(payload["pixels"], budget - payload_bytes(extra), extra)

    def decode(self, payload: Payload) -> torch.Tensor:
        if "shape" not in payload:
            return payload["pixels"]
        from ..data.base import resize_uint8

        height, width = (int(v) for v in payload["shape"])
        return resize_uint8(payload["pixels"], (height, width))

    def count(self, payload: Payload) -> int:
        return len(payload["pixels"])

    def smallest_exemplar(self, images: torch.Tensor) -> int:
        if not self._resizes(images):
            return images[0].numel()
        return images.shape[1] * self.size * self.size + payload_bytes(_shape_header(images))


def _shape_header(images: torch.Tensor) -> Payload:
    """The originals' height and width, which a resized payload keeps to resize them back."""
    return {"shape": torch.tensor(images.shape[-2:], dtype=torch.int16)}


class JPEGCodec:
    """Each exemplar a JPEG file from Pillow (Wang et al. 2022): the files' bytes, concatenated,
    and their lengths as int32. Grey images are encoded as mode L, colour ones as RGB."""

    def __init__(self, config: Any):
        self.quality = config.quality

    def _jpeg(self, image: torch.Tensor) -> bytes:
        from PIL import Image

        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=self.quality)
        return buffer.getvalue()

    def encode(self, images: torch.Tensor, budget: int, *, seed: int) -> Payload | None:
        return self._fitting_prefix((self._jpeg(image) for image in images), budget)

    def _fitting_prefix(self, files: Iterable[bytes], budget: int) -> Payload | None:
        """The first files (best first) whose bytes and int32 lengths fit ``budget``; the files
        past the first that does not fit are never made."""
        kept: list[bytes] = []
        used = 0
        for data in files:
            if used + len(data) + 4 > budget:
                break
            kept.append(data)
            used += len(data) + 4
        return self._payload(kept) if kept else None

    @staticmethod
    def _payload(files: list[bytes]) -> Payload:
        data = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
        return {"data": data, "lengths": torch.tensor([len(f) for f in files], dtype=torch.int32)}

    def _files(self, payload: Payload) -> list[bytes]:
        raw, files, start = payload["data"].numpy().tobytes(), [], 0
        for length in payload["lengths"].tolist():
            files.append(raw[start:start + length])
            start += length
        return files

    def shrink(self, payload: Payload, budget: int, *, seed: int) -> Payload | None:
        return self._fitting_prefix(self._files(payload), budget)  # drops from the end, re-encodes nothing

    def decode(self, payload: Payload) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        images = []
        for data in self._files(payload):
            array = np.asarray(Image.open(io.BytesIO(data)))
            images.append(torch.from_numpy((array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy()))
        return torch.stack(images)

    def count(self, payload: Payload) -> int:
        return len(payload["lengths"])

    def smallest_exemplar(self, images: torch.Tensor) -> int:
        return min(len(self._jpeg(image)) for image in images) + 4  # a file and its int32 length


NERV_HEADER = 4 + 16  # the payload's frame count and shape (int32)


class NeRVCodec:
    """One NeRV network per class (incremental.memory.nerv), stored as 8-bit pruned weights.
    The networks an experience fits (its new classes, and the old ones refitted to a smaller
    share) are fitted together as one batch. ``last_fits``: each fit's steps and PSNR."""

    def __init__(self, config: Any):
        self.config = config
        self.last_fits: list[Any] = []

    @property
    def per_channel(self) -> bool:
        return self.config.quantization == "per_channel"

    def _width(self, budget: int, images: torch.Tensor) -> int | None:
        from .nerv import widest_fitting

        c = self.config
        return widest_fitting(budget - NERV_HEADER, image_size=images.shape[-1], channels=images.shape[1],
                              levels=c.levels, prune=c.prune, max_width=c.max_width,
                              per_channel=self.per_channel)

    def _frames(self, budget: int, images: torch.Tensor) -> int:
        """``expansion`` times what raw pixels would fit, at least one, at most all."""
        raw_fit = budget // images[0].numel()
        return min(len(images), max(1, int(self.config.expansion * raw_fit)))

    def store_many(self, budget: int, shrink: list[tuple[Payload, int]], encode: list[tuple[torch.Tensor, int]]
                   ) -> tuple[list[Payload | None], list[Payload | None]]:
        """A payload over ``budget`` is refitted, narrower, to its own decoded frames (as many
        as a new class of this share gets, so the classes stay balanced); new classes are
        fitted to their first frames. All fits of one width run as one batch."""
        from .nerv import encode_many

        jobs: list[tuple[int, torch.Tensor, int]] = []  # (position in the output, frames, seed)
        results: list[Payload | None] = []
        for payload, seed in shrink:
            results.append(payload if payload_bytes(payload) <= budget else None)
            if results[-1] is None:
                jobs.append((len(results) - 1, self.decode(payload), seed))
        for images, seed in encode:
            results.append(None)
            if len(images):
                jobs.append((len(results) - 1, images, seed))
        by_width: dict[int, list[tuple[int, torch.Tensor, int]]] = {}
        for position, frames, seed in jobs:
            width = self._width(budget, frames)
            if width is not None:
                by_width.setdefault(width, []).append((position, frames[:self._frames(budget, frames)], seed))
        c = self.config
        self.last_fits = [None] * len(results)
        for width, group in sorted(by_width.items()):
            fitted = encode_many([frames for _, frames, _ in group], [seed for _, _, seed in group], width=width,
                                 levels=c.levels, steps=c.steps, lr=c.lr, beta1=c.beta1, prune=c.prune,
                                 finetune_steps=c.finetune_steps, target_psnr=c.target_psnr,
                                 per_channel=self.per_channel)
            for (position, _, _), (payload, report) in zip(group, fitted):
                results[position], self.last_fits[position] = payload, report
        return results[:len(shrink)], results[len(shrink):]

    def encode(self, images: torch.Tensor, budget: int, *, seed: int) -> Payload | None:
        return self.store_many(budget, [], [(images, seed)])[1][0]

    def shrink(self, payload: Payload, budget: int, *, seed: int) -> Payload | None:
        return self.store_many(budget, [(payload, seed)], [])[0][0]

    def decode(self, payload: Payload) -> torch.Tensor:
        from .nerv import decode_frames

        return decode_frames(payload)

    def count(self, payload: Payload) -> int:
        return int(payload["frames"][0])

    def smallest_exemplar(self, images: torch.Tensor) -> int:
        from .nerv import smallest_network_bytes

        c = self.config
        return NERV_HEADER + smallest_network_bytes(image_size=images.shape[-1], channels=images.shape[1],
                                                    levels=c.levels, prune=c.prune,
                                                    per_channel=self.per_channel)


def build_codec(spec: Any) -> ExemplarCodec:
    """The codec a ``protocol.memory.codec`` component names (raw when unset)."""
    from ..registry import CODECS

    if spec is None:
        return RawCodec()
    return CODECS.get(spec.name).obj(spec.config)
