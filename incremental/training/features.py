"""Pooled features of fixed image sets, computed once while the network under the head is
unchanged.

A frozen pre-trained backbone (SimpleCIL, RanPAC and APER after their first session, EASE's old
subspaces) gives the same pooled features for the same image under the eval transform at every
step. Evaluation after experience t then re-encodes the test images of experiences 0..t-1 for
nothing, and a 10-step run encodes each test set up to 10 times. The cache keeps the features of
each named image set (the test data of experience j, the training data of experience t) with the
*state* of the network that produced them, and returns them only while that state is unchanged.

The state is a fingerprint of every tensor the pooled features depend on: all of the model's
parameters and buffers except the head's and the output adapter's, which act on the pooled
features. Per tensor it records name, shape, dtype, device and two float64 sums computed on the
tensor's device (its plain sum, and its sum weighted by a fixed position pattern), so any
training step, load or in-place edit (``p.data`` included, which bypasses autograd's version
counters) changes it. A model holding state that is not a plain tensor (a dynamically quantised
int8 copy keeps packed weights outside its state dict's tensors) is not cached at all.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch
from torch import nn

# Modules after the pooled features: their tensors do not change the features.
AFTER_POOLING = ("head.", "output_adapter.")
_PATTERN_PERIOD = 1009  # a prime: a weight pattern no layer shape lines up with


_WEIGHTS: dict[torch.device, torch.Tensor] = {}  # per device, grown to the largest tensor seen


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    weights = _WEIGHTS.get(device)
    if weights is None or len(weights) < n:
        weights = (torch.arange(max(n, 1 << 16), device=device, dtype=torch.float64) % _PATTERN_PERIOD) + 1.0
        _WEIGHTS[device] = weights
    return weights[:n]


def state_fingerprint(model: nn.Module) -> tuple[Any, ...] | None:
    """What the pooled features of ``model`` depend on, as a hashable value; None when some of
    it is not a plain tensor (quantised modules), so it cannot be fingerprinted."""
    for module in model.modules():  # packed int8 weights live outside the state dict's tensors
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            return None
    names, sums = [], []
    for name, value in model.state_dict(keep_vars=True).items():
        if name.startswith(AFTER_POOLING):
            continue
        if not isinstance(value, torch.Tensor) or value.is_quantized or not (
                value.is_floating_point() or value.dtype in (torch.int64, torch.int32, torch.bool, torch.uint8)):
            return None
        flat = value.detach().reshape(-1).to(torch.float64)
        names.append((name, tuple(value.shape), str(value.dtype), str(value.device)))
        sums.append(flat.sum())
        sums.append(torch.dot(flat, _position_weights(flat.numel(), flat.device)))
    values = torch.stack(sums).tolist() if sums else []  # one device-to-host copy
    return tuple(names), tuple(values)


class FeatureCache:
    """Features by key (``("eval", "test", 3, 360)``, ``("train", 3, 290)``: an image set), each
    valid for one network state.

    ``max_bytes`` bounds what is held; the least recently used sets are dropped first (0 turns
    the cache off). ``hits`` and ``misses`` count lookups, for the run's phase report."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, key: Hashable, state: Any) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None or state is None or entry[0] != state:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def store(self, key: Hashable, state: Any, features: torch.Tensor) -> None:
        if state is None or not self.enabled:
            return
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        self._entries.pop(key, None)
        while self._entries and self.held_bytes() + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = (state, features)

    def held_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for _, f in self._entries.values())

    def features(self, key: Hashable, model: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached features of ``key`` for ``model``'s current state, else ``compute()`` (stored)."""
        if not self.enabled:
            return compute()
        state = state_fingerprint(model)
        cached = self.lookup(key, state)
        if cached is not None:
            return cached
        features = compute()
        self.store(key, state, features)
        return features

    def clear(self) -> None:
        self._entries.clear()


class EvalFeatures:
    """One evaluation pass over an image set in loader order (unshuffled, so the same rows come
    in the same batches each time; under torchrun, this process's fixed shard): hands out each
    minibatch's cached features, or collects the computed ones and stores them when the pass
    ends under an unchanged network state."""

    def __init__(self, cache: FeatureCache, key: Hashable, model: nn.Module):
        self.cache, self.key = cache, key
        self.state = state_fingerprint(model)
        self.cached = cache.lookup(key, self.state)
        self.parts: list[torch.Tensor] = []
        self.offset = 0

    def pooled(self, batch_size: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        start, self.offset = self.offset, self.offset + batch_size
        if self.cached is not None and self.offset <= len(self.cached):
            return self.cached[start:self.offset]
        self.cached = None  # more rows than were cached: not the same image set
        features = compute()
        self.parts.append(features.detach())
        return features

    def cached_batches(self, targets: Any, task_labels: Any, batch_size: int) -> list[list[torch.Tensor]] | None:
        """On a hit, the pass's minibatches ``[pooled features, y, t]`` in loader order, so no
        image is read or transformed; None on a miss or when the set's size is not the cached
        one. ``targets`` and ``task_labels``: the set's labels in dataset order."""
        if self.cached is None or len(targets) != len(self.cached):
            return None
        labels = torch.as_tensor(list(targets), dtype=torch.long)
        tasks = torch.as_tensor(list(task_labels), dtype=torch.long)
        return [[self.cached[start:start + batch_size], labels[start:start + batch_size],
                 tasks[start:start + batch_size]] for start in range(0, len(labels), batch_size)]

    def finish(self, model: nn.Module) -> None:
        """Store what the completed pass computed, if the network did not change during it."""
        if self.parts and self.cached is None and state_fingerprint(model) == self.state:
            features = torch.cat(self.parts)
            if len(features) == self.offset:
                self.cache.store(self.key, self.state, features)


def start_without_reading(loader: Any) -> bool:
    """Make the random draws a pass over the evaluation ``loader`` makes, without reading an
    image, and say so; False where that is not cheap, and the caller reads the images.

    A torch DataLoader pass draws its workers' base seed from the global generator when it
    starts. A pass over cached features that skipped it would leave the run's random stream
    depending on what the cache held, and a resumed run, whose cache starts empty, would then
    diverge from the uninterrupted one. Without workers, starting the DataLoader's iterator
    draws the seed and reads nothing; with workers it starts processes, so the images are read.
    The device data path draws nothing when it evaluates."""
    from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader

    from ..data.device import DeviceBatchLoader

    if isinstance(loader, DeviceBatchLoader):
        return not loader.train
    inner = loader._get_loader() if isinstance(loader, SingleDatasetDataLoader) else loader
    if isinstance(inner, torch.utils.data.DataLoader) and inner.num_workers == 0:
        iter(inner)
        return True
    return False
