"""Class orders: seeded permutations and the named orders of published protocols."""

from __future__ import annotations

from typing import Callable

import numpy as np


def numpy_permutation(num_classes: int, seed: int) -> list[int]:
    """``np.random.seed(seed); np.random.permutation(n)``: how PyCIL, PODNet and iCaRL draw
    class orders. numpy's legacy RandomState keeps this stream stable across versions."""
    return np.random.RandomState(seed).permutation(num_classes).tolist()


# name -> (number of classes, order). "cifar100_seed1993" is the order on which iCaRL,
# PODNet, PyCIL and DER report CIFAR-100 (PODNet's first of its three orders).
NAMED_CLASS_ORDERS: dict[str, tuple[int, Callable[[], list[int]]]] = {
    "cifar100_seed1993": (100, lambda: numpy_permutation(100, 1993)),
}
ORDER_KEYWORDS = ("random", "sorted")
NAMED_ORDER_NAMES = tuple(NAMED_CLASS_ORDERS)
