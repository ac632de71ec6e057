"""Class orders and splits (B0, B50, uneven), and the Avalanche benchmark built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incremental.config import ProtocolConfig, parse_dataclass
from incremental.data import build_dataset
from incremental.data.digits import DigitsConfig
from incremental.data.synthetic import SyntheticConfig
from incremental.errors import ConfigError
from incremental.protocol import build_benchmark, make_class_split, resolve_class_order, split_classes

# The CIFAR-100 order published with iCaRL/PODNet/PyCIL results (reference data).
PUBLISHED_CIFAR100_ORDER = [
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85,
    19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54,
    37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11,
    12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
]


def protocol(**kwargs) -> ProtocolConfig:
    return parse_dataclass(ProtocolConfig, kwargs)


@pytest.mark.parametrize("kwargs, n, expected", [
    (dict(initial_classes=0, increment=10), 100, [10] * 10),          # B0, 10 steps
    (dict(initial_classes=50, increment=10), 100, [50] + [10] * 5),   # B50, 5 steps
    (dict(initial_classes=50, increment=5), 100, [50] + [5] * 10),    # B50, 10 steps
    (dict(initial_classes=500, increment=100), 1000, [500] + [100] * 5),  # ViTIL's B500
    (dict(initial_classes=0, increment=[4, 3, 3]), 10, [4, 3, 3]),    # uneven, B0
    (dict(initial_classes=4, increment=[1, 5]), 10, [4, 1, 5]),       # uneven after a base
    (dict(initial_classes=10, increment=5), 10, [10]),                # everything at once
])
def test_split_classes(kwargs, n, expected):
    assert split_classes(protocol(**kwargs), n) == expected


@pytest.mark.parametrize("kwargs, n, message", [
    (dict(initial_classes=0, increment=3), 10, "10 classes do not split into steps of 3"),
    (dict(initial_classes=50, increment=[10, 10]), 100, "increments add up to 20, but must cover the 50"),
    (dict(initial_classes=0, increment=[5, 4]), 10, r"increments add up to 9, but must cover all \(10 classes\)"),
    (dict(initial_classes=12, increment=2), 10, "12 initial classes, but the protocol has only 10"),
])
def test_split_errors(kwargs, n, message):
    with pytest.raises(ConfigError, match=message):
        split_classes(protocol(**kwargs), n)


def test_seeded_orders_are_pycil_permutations():
    order = resolve_class_order(protocol(class_order="random"), 100, seed=1993)
    np.random.seed(1993)
    assert order == np.random.permutation(100).tolist() == PUBLISHED_CIFAR100_ORDER
    assert resolve_class_order(protocol(class_order="random", order_seed=1993), 100, seed=5) == order
    assert resolve_class_order(protocol(class_order="random"), 100, seed=5) != order
    assert resolve_class_order(protocol(class_order="cifar100_seed1993"), 100, seed=0) == PUBLISHED_CIFAR100_ORDER
    assert resolve_class_order(protocol(class_order="sorted"), 5, seed=0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("order, n, message", [
    ([0, 1, 1, 2], 10, r"listed more than once: \[1\]"),
    ([0, 1, 12], 10, r"classes \[12\] do not exist"),
    ("cifar100_seed1993", 10, "is for 100 classes; the dataset has 10"),
    ("randon", 10, "unknown class order 'randon' \\(did you mean 'random'\\?\\)"),
])
def test_order_errors(order, n, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_class_order(protocol(class_order=order), n, seed=0)
    assert info.value.key == "protocol.class_order"


def test_explicit_order_may_use_a_subset_of_classes():
    split = make_class_split(protocol(class_order=[7, 3, 5, 1], increment=2), 10, seed=0)
    assert split.experiences == [[7, 3], [5, 1]]


@pytest.fixture(scope="module")
def synthetic():
    return build_dataset("synthetic", SyntheticConfig(num_classes=12, train_per_class=6, test_per_class=3,
                                                      image_size=8))


def test_benchmark_streams_follow_the_class_order(synthetic):
    split = make_class_split(protocol(initial_classes=6, increment=[2, 4], class_order="random"), 12, seed=4)
    bench = build_benchmark(synthetic, split)
    assert len(bench.train_stream) == len(bench.test_stream) == 3
    test_images_of = {c: [synthetic.eval_transform(synthetic.test.images[i])
                          for i, t in enumerate(synthetic.test.targets) if t == c] for c in range(12)}
    for k, (train_exp, test_exp) in enumerate(zip(bench.train_stream, bench.test_stream)):
        labels = split.label_ranges()[k]
        assert set(train_exp.classes_in_this_experience) == set(labels)
        assert len(train_exp.dataset) == 6 * len(labels) and len(test_exp.dataset) == 3 * len(labels)
        # the remapped label of each sample is the position of its original class in the order,
        # and the image is one of that original class's test images
        for i in range(len(test_exp.dataset)):
            image, label = test_exp.dataset[i][:2]
            original = split.class_order[label]
            assert original in split.experiences[k]
            assert any(torch.equal(image, candidate) for candidate in test_images_of[original])


def test_train_data_is_augmented_and_test_data_is_not():
    splits = build_dataset("digits", DigitsConfig(image_size=16))
    split = make_class_split(protocol(increment=5, class_order="sorted"), 10, seed=0)
    bench = build_benchmark(splits, split)
    test = bench.test_stream[0].dataset
    assert all(bool((test[0][0] == test[0][0]).all()) for _ in range(3))  # eval transform is deterministic
    train = bench.train_stream[0].dataset
    draws = [train[0][0] for _ in range(8)]
    assert any(not bool((draws[0] == d).all()) for d in draws[1:])  # random crops differ
    assert bool((train.eval()[0][0] == splits.eval_transform(splits.train.images[_first_sorted(splits)])).all())


def _first_sorted(splits) -> int:
    # class_incremental_benchmark lists samples class by class, the last class of an experience first
    return [i for i, t in enumerate(splits.train.targets) if t == 4][0]
