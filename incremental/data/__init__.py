"""Datasets by name. Each loader returns :class:`DatasetSplits` of plain torch datasets
with a ``targets`` list; :mod:`incremental.protocol` turns them into an Avalanche
class-incremental benchmark."""

from .base import DatasetSplits, TensorImageDataset, build_dataset

__all__ = ["DatasetSplits", "TensorImageDataset", "build_dataset"]
