"""Datasets by name. Each loader returns :class:`DatasetSplits` of plain torch datasets
with a ``targets`` list; :mod:`incremental.protocol` turns them into an Avalanche
class-incremental benchmark. ``options`` declares the built-ins without importing torch."""

from typing import Any

__all__ = ["DatasetSplits", "TensorImageDataset", "build_dataset"]


def __getattr__(name: str) -> Any:
    # The loaders import torch: loaded on first use, so that the package (and the datasets'
    # declarations in .options) stays light for `incremental list` and config validation.
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
