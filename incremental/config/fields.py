"""What a component's config is made of: the fields plugin authors import.

``opt`` is a dataclass field with a numeric range checked on load; ``Component`` is a section
that picks a registered component by name (``{name: vit, depth: 6}``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Upper bounds shared by many options: a value beyond them is a typo (2**40 channels would try
# to allocate), so the loader stops it with one line instead of a crash or a hang.
SEED_MAX = 2 ** 32 - 1  # numpy's and torch's seeds are 32-bit where it matters
MAX_SIZE = 4096  # image sizes, in pixels
MAX_WIDTH = 16384  # channels, embedding widths
MAX_DEPTH = 1024  # blocks, heads, stages
MAX_BATCH = 2 ** 20
MAX_EPOCHS = 100_000
MAX_COUNT = 10 ** 9  # samples, exemplars, classes
MAX_WEIGHT = 1e6  # loss weights and scale factors


def opt(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, factory: Any = None) -> Any:
    """A dataclass field with an optional numeric range, checked on load."""
    metadata = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Component:
    """A registered component chosen by name, with its typed options. ``common`` holds the
    options every component of its kind takes (for backbones: ``pretrained``, ``compress``)."""

    name: str
    config: Any = None
    common: Any = None


def component(kind: str, default: str | None = None) -> Any:
    """A field holding a :class:`Component` from registry ``kind`` (``"backbones"``...)."""
    return field(default=None, metadata={"registry": kind, "default_name": default})


def component_list(kind: str) -> Any:
    return field(default_factory=list, metadata={"registry": kind})


@dataclass
class EmptyConfig:
    """Options of a component that takes none."""
