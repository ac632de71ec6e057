"""Class-balanced exemplar memory that stores sample indices, not samples.

Each class keeps a priority-ordered list of indices into the training dataset of the
experience it came from; shrinking a class's quota truncates its list, as iCaRL does.
Indices (plain ints) make the memory cheap to checkpoint and rebuild.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F


def herding_order(features: torch.Tensor) -> list[int]:
    """iCaRL herding (Rebuffi et al. 2017, Alg. 4) on L2-normalised features: the k-th pick
    brings the mean of the first k picks closest to the class mean."""
    feats = F.normalize(features.float(), dim=1)
    mean = feats.mean(dim=0)
    running = torch.zeros_like(mean)
    taken = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    order: list[int] = []
    for k in range(1, len(feats) + 1):
        distance = ((mean - (running + feats) / k) ** 2).sum(dim=1)
        distance[taken] = float("inf")
        pick = int(distance.argmin())
        order.append(pick)
        taken[pick] = True
        running += feats[pick]
    return order


def class_quotas(num_classes: int, *, total: int | None, per_class: int | None) -> list[int]:
    """Exemplars allowed per class, in class order: a fixed total split evenly (the first
    classes take the remainder), or a fixed number per class."""
    if per_class is not None:
        return [per_class] * num_classes
    if not total or not num_classes:
        return [0] * num_classes
    base, extra = divmod(total, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


class ExemplarMemory:
    """``{label: (experience, [indices in that experience's train set, best first])}``."""

    def __init__(self, *, total: int | None, per_class: int | None):
        self.total = total
        self.per_class = per_class
        self.exemplars: dict[int, tuple[int, list[int]]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.total) or bool(self.per_class)

    def __len__(self) -> int:
        return sum(len(indices) for _, indices in self.exemplars.values())

    def add_classes(self, experience: int, ranked: dict[int, list[int]]) -> None:
        """Add new classes (label -> indices ranked best first), then rebalance quotas."""
        for label, indices in ranked.items():
            self.exemplars[label] = (experience, list(indices))
        labels = sorted(self.exemplars)
        for label, quota in zip(labels, class_quotas(len(labels), total=self.total, per_class=self.per_class)):
            exp, indices = self.exemplars[label]
            self.exemplars[label] = (exp, indices[:quota])

    def samples(self) -> list[tuple[int, int]]:
        """Every exemplar as ``(experience, index)``, in the order of :meth:`dataset`."""
        return sorted((exp, index) for exp, indices in self.exemplars.values() for index in indices)

    def dataset(self, experience_dataset: Callable[[int], Any]) -> Any | None:
        """The exemplars as one Avalanche dataset (None when empty), in :meth:`samples` order."""
        by_experience: dict[int, list[int]] = {}
        for exp, index in self.samples():
            by_experience.setdefault(exp, []).append(index)
        parts = [experience_dataset(exp).subset(idx) for exp, idx in by_experience.items()]
        if not parts:
            return None
        data = parts[0]
        for part in parts[1:]:
            data = data.concat(part)
        return data

    def state_dict(self) -> dict[str, Any]:
        return {"exemplars": {str(k): [e, list(v)] for k, (e, v) in self.exemplars.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exemplars = {int(k): (int(e), [int(i) for i in v]) for k, (e, v) in state["exemplars"].items()}


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset: Any, *, batch_size: int, device: Any,
                     engine: Any = None) -> torch.Tensor:
    """Pooled (pre-logit) features of a dataset, in eval mode and with eval transforms (on the
    CPU, in the dataset's order). Under torchrun each rank extracts its contiguous part and the
    parts are gathered, so every rank gets the same features for a world-size-th of the work.

    ``engine``: the run's training engine; its device data path (images kept on the device,
    eval-transformed there in batches) is used when the dataset's images are stored ones. The
    features stay fp32 whatever the run's precision: herding, class means, prototypes and
    RanPAC's Gram matrix are statistics over them, and low-precision features would bias them."""
    from torch.utils.data import DataLoader, Subset

    from ..distributed import current, gather_shards, shard_range

    was_training = model.training
    model.eval()
    dist = current()
    sharded = dist.enabled and len(dataset) >= dist.world_size  # else every rank has a part to gather
    data = dataset
    if sharded:
        rows = shard_range(len(dataset), dist).tolist()
        data = dataset.subset(rows) if hasattr(dataset, "subset") else Subset(dataset.eval(), rows)
    loader = None
    if engine is not None and hasattr(data, "remove_current_transform_group"):  # an Avalanche dataset
        # the dataset as given: the device loader applies the eval transform itself (and reading
        # the stored images of a dataset switched to another transform group fails in Avalanche)
        loader = engine.device_batches(data, batch_size=batch_size, train=False, shuffle=False, drop_last=False,
                                       sharded=False)
    if loader is None:
        # Its own generator: a DataLoader draws a seed from the global RNG otherwise, and this
        # evaluation-side pass would change the training's random stream.
        loader = DataLoader(data.eval() if hasattr(data, "eval") else data, batch_size=batch_size, shuffle=False,
                            generator=torch.Generator())
    from ..progress import bar

    feats = []
    with bar(len(loader), "feature pass", unit="batch") as progress:
        for batch in loader:
            x = batch[0].to(device)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
            progress.update(1)
    model.train(was_training)
    if not feats:
        return torch.empty(0)
    features = torch.cat(feats)
    if sharded:
        features = gather_shards(features, len(dataset), dist)
    return features.cpu()


def indices_by_label(targets: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        groups.setdefault(int(label), []).append(index)
    return groups
