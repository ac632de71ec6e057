"""What the toolkit remembers of past classes: exemplar selection (``selection``), and memories
counted in bytes (``budget``) with their codecs (``codecs``, ``nerv``) and generators (``gan``).

The names below are imported on first use: ``incremental.memory.options`` is read when a
config is validated, which must not import torch.
"""

from __future__ import annotations

from typing import Any

_SELECTION = ("ExemplarMemory", "class_quotas", "extract_features", "herding_order", "indices_by_label")
__all__ = list(_SELECTION)


def __getattr__(name: str) -> Any:
    if name in _SELECTION:
        from . import selection

        return getattr(selection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
