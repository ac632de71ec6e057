"""Sizes checked against the memory they imply, before any data is loaded.

A range check lets ``projection_dim: 100000`` through (RanPAC's M x M fp64 Gram matrix is then
80 GB), and the run would die much later in an allocator traceback. Each component's config may
declare ``memory_needs(run) -> list[MemoryNeed]``: lower bounds of what its sizes allocate, with
the option that sets them. The check compares each need, and the sum on each side, with the memory
there is (host RAM, or the GPU's for what lives on it) and refuses in one line naming the key, the
bytes and the memory. No torch here: ``incremental check`` runs it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError

FLOAT32, FLOAT64 = 4, 8
# a trained parameter holds its value, its gradient and AdamW's two moments
TRAINED_PARAMETER_BYTES = 4 * FLOAT32


@dataclass(frozen=True)
class MemoryNeed:
    """A lower bound of what an option allocates. ``key`` is relative to the section that declares
    it (the checker prefixes ``strategy.`` and so on) unless ``from_root``; ``on_device``: where
    the model trains (the GPU on CUDA runs), else host RAM."""

    key: str
    bytes: int
    what: str
    on_device: bool = True
    from_root: bool = False  # ``key`` is already a full path (a size set in another section)


def readable_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def available_host_memory() -> int:
    """Bytes the kernel says a new allocation can have now (MemAvailable), or physical memory
    where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def image_geometry(run: Any) -> tuple[int, int]:
    """(channels, side) of the run's images as far as the config says: the dataset's or the
    backbone's ``image_size``/``img_size``, else CIFAR's 32 px (a lower bound for the estimates)."""
    side = getattr(run.backbone.config, "img_size", None) or getattr(run.dataset.config, "image_size", None) or 32
    channels = 1 if run.dataset.name == "digits" else 3  # digits are grey; 3 bounds the rest from below
    return channels, int(side)


def backbone_width(run: Any) -> int:
    """The backbone's token width where its config states one, else 192 (ViT-Tiny's, the
    narrowest of timm's ViTs): the estimates stay lower bounds."""
    width = getattr(run.backbone.config, "embed_dim", None)
    return int(width) if isinstance(width, int) else 192


def transformer_needs(run: Any, *, width: int, depth: int, mlp_ratio: float, patch_size: int) -> list[MemoryNeed]:
    """A ViT's trained parameters (12 D^2 per block at MLP ratio 4) and the activations one
    training batch keeps for the backward pass (at least 8 D values per token per block)."""
    _, side = image_geometry(run)
    tokens = (side // max(patch_size, 1)) ** 2 + 1
    per_block = int((4 + 2 * mlp_ratio) * width * width)
    batch = run.training.batch_size
    return [MemoryNeed("embed_dim", depth * per_block * TRAINED_PARAMETER_BYTES,
                       f"{depth} blocks of width {width} trained with AdamW"),
            MemoryNeed("training.batch_size", batch * tokens * width * 8 * depth * FLOAT32,
                       f"the activations of a training batch of {batch} ({tokens} tokens of width {width}, "
                       f"{depth} blocks)", from_root=True)]


def training_batch_needs(run: Any) -> list[MemoryNeed]:
    """The images of one training and one evaluation batch as fp32 tensors (the least a batch
    size times an image size costs, whatever the backbone)."""
    channels, side = image_geometry(run)
    image = channels * side * side * FLOAT32
    return [MemoryNeed("training.batch_size", run.training.batch_size * image,
                       f"a training batch of {run.training.batch_size} images of {side} px", from_root=True),
            MemoryNeed("training.eval_batch_size", run.training.eval_batch_size * image,
                       f"an evaluation batch of {run.training.eval_batch_size} images of {side} px", from_root=True)]


def run_memory_needs(run: Any) -> list[MemoryNeed]:
    """Every need of the run, with keys from the config's root."""
    needs = training_batch_needs(run)
    sections = [("backbone", run.backbone), ("strategy", run.strategy), ("dataset", run.dataset)]
    sections += [(f"probes.{i}", spec) for i, spec in enumerate(run.probes)]
    for prefix, component in sections:
        declared: Callable[[Any], list[MemoryNeed]] | None = getattr(component.config, "memory_needs", None)
        for need in declared(run) if declared else ():
            key = need.key if need.from_root else f"{prefix}.{need.key}"
            needs.append(MemoryNeed(key, need.bytes, need.what, need.on_device, from_root=True))
    return needs


def check_memory(run: Any, *, host_bytes: int | None = None, device_bytes: int | None = None,
                 device_name: str = "the GPU") -> None:
    """Refuse a run whose sizes need more memory than there is: each need alone, then each side's
    sum (named by its largest need). ``device_bytes`` None: the model trains in host RAM."""
    host = available_host_memory() if host_bytes is None else host_bytes
    needs = run_memory_needs(run)
    sides = [(host, "host RAM available", [n for n in needs if not n.on_device or device_bytes is None])]
    if device_bytes is not None:
        sides.append((device_bytes, f"free on {device_name}", [n for n in needs if n.on_device]))
    for limit, where, side_needs in sides:
        for need in sorted(side_needs, key=lambda n: -n.bytes):
            if need.bytes > limit:
                raise ConfigError(f"{need.what} needs at least {readable_bytes(need.bytes)}; "
                                  f"{readable_bytes(limit)} {where}", key=need.key)
        total = sum(n.bytes for n in side_needs)
        if side_needs and total > limit:
            largest = max(side_needs, key=lambda n: n.bytes)
            raise ConfigError(f"the run's sizes need at least {readable_bytes(total)} together ({largest.what}: "
                              f"{readable_bytes(largest.bytes)}); {readable_bytes(limit)} {where}", key=largest.key)
