"""Options every probe takes, next to its own."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.fields import opt


@dataclass
class ProbeOptions:
    """Options every probe takes, next to its own."""

    num_samples: int | None = opt(None, ge=1)  # seen-class test images per step; None: the probe's default
    batch_size: int = opt(250, ge=1)
    every: int = opt(1, ge=1)  # probe after every k-th experience; the last one is always probed
    label: str | None = None  # the results key (default: the probe's name); needed to list a probe twice
