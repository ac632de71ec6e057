"""Long-tailed protocols (protocol.long_tail): the per-class training counts follow Cao et al.'s
exponential profile, ordered along the class order or shuffled over it, the kept images are a
seeded subset of the class's own, and the test set stays whole."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from incremental.config import load_config
from incremental.data import build_dataset
from incremental.protocol import build_benchmark, long_tail_counts, long_tail_subset, make_class_split


def test_the_counts_are_the_exponential_profile():
    counts = long_tail_counts([500] * 100, list(range(100)), 0.01)
    expected = [int(500 * 0.01 ** (r / 99)) for r in range(100)]
    assert counts == expected and counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert long_tail_counts([10, 3, 10], [0, 1, 2], 0.5) == [10, 3, 5]  # never more than a class has
    assert long_tail_counts([4, 4], [1, 0], 0.01) == [1, 4]  # at least one image


def test_the_subset_keeps_each_labels_count_from_its_own_images():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 200).tolist()
    kept = long_tail_subset(targets, [20, 10, 5, 1], seed=7)
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    assert Counter(targets[i] for i in kept) == Counter({0: 20, 1: 10, 2: 5, 3: 1})
    assert kept == long_tail_subset(targets, [20, 10, 5, 1], seed=7)
    assert kept != long_tail_subset(targets, [20, 10, 5, 1], seed=8)


def _split(order: str, seed: int = 1993):
    cfg, _ = load_config("digits_b0_5steps", [f"protocol.long_tail={{imbalance_ratio: 0.1, order: {order}}}",
                                              f"protocol.order_seed={seed}"])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    return splits, make_class_split(cfg.protocol, splits.num_classes, cfg.seed)


@pytest.mark.parametrize("order", ["ordered", "shuffled"])
def test_a_long_tailed_benchmark_subsamples_training_only(order):
    splits, split = _split(order)
    ranks = list(split.tail_ranks)
    assert sorted(ranks) == list(range(10))
    assert (ranks == list(range(10))) == (order == "ordered")
    benchmark = build_benchmark(splits, split)
    train = Counter(int(y) for exp in benchmark.train_stream for y in exp.dataset.targets)
    available = Counter(int(t) for t in splits.train.targets)
    have = [available[c] for c in split.class_order]  # by label (position in the class order)
    assert [train[label] for label in range(10)] == long_tail_counts(have, ranks, 0.1)
    test = Counter(int(y) for exp in benchmark.test_stream for y in exp.dataset.targets)
    assert sum(test.values()) == len(splits.test)  # the test set is whole
    if order == "ordered":  # the head classes come first
        sizes = [train[label] for label in range(10)]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 5


def test_shuffled_ranks_follow_the_order_seed():
    _, first = _split("shuffled", 1)
    _, again = _split("shuffled", 1)
    _, other = _split("shuffled", 2)
    assert first.tail_ranks == again.tail_ranks and first.tail_ranks != other.tail_ranks


def test_a_balanced_protocol_is_untouched():
    cfg, _ = load_config("digits_b0_5steps", [])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    assert split.tail_ranks is None
    benchmark = build_benchmark(splits, split)
    assert sum(len(exp.dataset) for exp in benchmark.train_stream) == len(splits.train)
