"""From a protocol config to an Avalanche class-incremental benchmark.

Labels are remapped to their position in the class order before Avalanche sees them, as
PyCIL and PODNet do: experience k then holds the consecutive label range after experience
k-1's, and a growing classifier appends output units in experience order. The original
class ids are kept in :class:`ClassSplit` (and in metrics.json as ``class_order``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from .class_orders import NAMED_CLASS_ORDERS, ORDER_KEYWORDS, numpy_permutation
from .config import ProtocolConfig
from .data.base import DatasetSplits
from .errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class ClassSplit:
    """The class order (original ids) and how many classes each experience gets."""

    class_order: tuple[int, ...]
    classes_per_experience: tuple[int, ...]
    # long-tailed training data (protocol.long_tail): each label's rank and the ratio; 1 is balanced
    tail_ranks: tuple[int, ...] | None = None
    imbalance_ratio: float = 1.0
    subset_seed: int = 0

    @property
    def num_experiences(self) -> int:
        return len(self.classes_per_experience)

    @property
    def experiences(self) -> list[list[int]]:
        """Original class ids of each experience."""
        bounds = np.cumsum((0,) + self.classes_per_experience)
        return [list(self.class_order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def label_ranges(self) -> list[range]:
        """Remapped labels of each experience."""
        bounds = np.cumsum((0,) + self.classes_per_experience).tolist()
        return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def label_experience(self) -> list[int]:
        """Experience of each remapped label."""
        return [exp for exp, count in enumerate(self.classes_per_experience) for _ in range(count)]


def label_texts(class_names: Sequence[str], class_order: Sequence[int]) -> list[str]:
    """The class names in label order (position in the class order), as a text encoder reads
    them: underscores as spaces (CIFAR's ``aquarium_fish``)."""
    return [class_names[c].replace("_", " ") for c in class_order]


def resolve_class_order(cfg: ProtocolConfig, num_classes: int, seed: int) -> list[int]:
    order = cfg.class_order
    if isinstance(order, list):
        unknown = sorted({c for c in order if not 0 <= c < num_classes})
        if unknown:
            raise ConfigError(f"classes {unknown[:5]} do not exist (the dataset has ids 0..{num_classes - 1})",
                              key="protocol.class_order")
        duplicates = sorted({c for c in order if order.count(c) > 1})
        if duplicates:
            raise ConfigError(f"classes listed more than once: {duplicates[:5]}", key="protocol.class_order")
        if not order:
            raise ConfigError("must list at least one class", key="protocol.class_order")
        return list(order)
    if order == "random":
        return numpy_permutation(num_classes, seed if cfg.order_seed is None else cfg.order_seed)
    if order == "sorted":
        return list(range(num_classes))
    if order in NAMED_CLASS_ORDERS:
        size, make = NAMED_CLASS_ORDERS[order]
        if size != num_classes:
            raise ConfigError(f"order {order!r} is for {size} classes; the dataset has {num_classes}",
                              key="protocol.class_order")
        return list(make())
    choices = list(ORDER_KEYWORDS) + list(NAMED_CLASS_ORDERS)
    raise ConfigError(f"unknown class order {order!r}{did_you_mean(order, choices)}; expected "
                      f"{', '.join(choices)} or a list of class ids", key="protocol.class_order")


def split_classes(cfg: ProtocolConfig, num_classes: int) -> list[int]:
    """Classes per experience for B0 / B<initial> protocols with even or listed increments."""
    first = [cfg.initial_classes] if cfg.initial_classes > 0 else []
    remaining = num_classes - cfg.initial_classes
    if remaining < 0:
        raise ConfigError(f"{cfg.initial_classes} initial classes, but the protocol has only {num_classes}",
                          key="protocol.initial_classes")
    if isinstance(cfg.increment, list):
        if sum(cfg.increment) != remaining:
            what = "all" if not first else f"the {remaining} after the {cfg.initial_classes} initial ones"
            raise ConfigError(f"increments add up to {sum(cfg.increment)}, but must cover {what} "
                              f"({remaining} classes)", key="protocol.increment")
        return first + list(cfg.increment)
    if remaining % cfg.increment:
        raise ConfigError(f"{remaining} classes do not split into steps of {cfg.increment}",
                          key="protocol.increment")
    steps = first + [cfg.increment] * (remaining // cfg.increment)
    if not steps:
        raise ConfigError("the protocol has no experiences", key="protocol.initial_classes")
    return steps


def make_class_split(cfg: ProtocolConfig, num_classes: int, seed: int) -> ClassSplit:
    order = resolve_class_order(cfg, num_classes, seed)
    base_seed = seed if cfg.order_seed is None else cfg.order_seed
    tail = cfg.long_tail
    ranks = None
    if tail.imbalance_ratio < 1:
        ranks = tuple(range(len(order))) if tail.order == "ordered" else \
            tuple(int(r) for r in np.random.default_rng([base_seed, 1]).permutation(len(order)))
    return ClassSplit(tuple(order), tuple(split_classes(cfg, len(order))), ranks, tail.imbalance_ratio, base_seed)


def long_tail_counts(available: Sequence[int], ranks: Sequence[int], ratio: float) -> list[int]:
    """Training images per label: ``n_max x ratio ^ (rank / (C - 1))``, floored, n_max the largest of
    ``available`` (Cao et al. 2019's long-tailed CIFAR); at least 1, at most what the label has."""
    n_max, steps = max(available), max(len(ranks) - 1, 1)
    return [max(1, min(have, int(n_max * ratio ** (rank / steps)))) for have, rank in zip(available, ranks)]


def long_tail_subset(targets: Sequence[int], counts: Sequence[int], seed: int) -> list[int]:
    """Positions in ``targets`` (labels 0..C-1) to keep: ``counts[label]`` of each label, a seeded
    random choice, in their original order."""
    targets = np.asarray(targets)
    rng = np.random.default_rng([seed, 2])
    keep = [rng.permutation(np.flatnonzero(targets == label))[:count] for label, count in enumerate(counts)]
    return sorted(int(i) for part in keep for i in part)


class OrderedClassSubset(Dataset):
    """The samples of the classes in ``order``, relabelled by their position in it; with ``split``'s
    long tail, only the training samples it keeps."""

    def __init__(self, base: Dataset, order: Sequence[int], split: ClassSplit | None = None):
        position = {c: i for i, c in enumerate(order)}
        base_targets = list(base.targets)  # type: ignore[attr-defined]
        self.base = base
        self.indices = [i for i, t in enumerate(base_targets) if t in position]
        self.targets = [position[base_targets[i]] for i in self.indices]
        if split is not None and split.tail_ranks is not None:
            available = np.bincount(self.targets, minlength=len(order)).tolist()
            counts = long_tail_counts(available, split.tail_ranks, split.imbalance_ratio)
            kept = long_tail_subset(self.targets, counts, split.subset_seed)
            self.indices = [self.indices[i] for i in kept]
            self.targets = [self.targets[i] for i in kept]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, _ = self.base[self.indices[index]]
        return x, self.targets[index]


def classification_dataset(data: Dataset, splits: DatasetSplits) -> Any:
    """``data`` (samples ``(image, label)``) as an Avalanche dataset with the dataset's train and
    eval transform groups, like the experiences' own. Task label 0 on every sample, as
    nc_benchmark gives: batches are (x, y, t), which Avalanche's plugins (LwF, EWC, BiC, DER's
    logits) expect even without tasks."""
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    groups = {"train": splits.train_transform, "eval": splits.eval_transform}
    return _make_taskaware_classification_dataset(data, transform_groups=groups, task_labels=0)


def build_benchmark(splits: DatasetSplits, class_split: ClassSplit) -> Any:
    """An Avalanche CLScenario with ``train_stream`` and ``test_stream``."""
    from avalanche.benchmarks.scenarios import class_incremental_benchmark

    streams = {}
    for stream, data, group in (("train", splits.train, "train"), ("test", splits.test, "eval")):
        subset = OrderedClassSubset(data, class_split.class_order, class_split if stream == "train" else None)
        missing = sorted(set(range(len(class_split.class_order))) - set(subset.targets))
        if missing:
            names = [class_split.class_order[i] for i in missing[:5]]
            raise ConfigError(f"the {stream} split has no samples of classes {names}", key="protocol.class_order")
        dataset = classification_dataset(subset, splits)
        streams[stream] = dataset.train() if group == "train" else dataset.eval()
    return class_incremental_benchmark(
        streams,
        class_order=list(range(len(class_split.class_order))),
        num_classes_per_exp=list(class_split.classes_per_experience),
    )
