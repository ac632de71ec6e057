"""Exemplar memory: herding against a brute-force reference, quotas, budgets."""

from __future__ import annotations

import torch

from incremental.memory import ExemplarMemory, class_quotas, herding_order
from torch.nn import functional as F


def test_herding_matches_brute_force_greedy():
    torch.manual_seed(0)
    feats = torch.randn(12, 5)
    normed = F.normalize(feats, dim=1)
    mean = normed.mean(0)
    expected, chosen = [], []
    for k in range(1, 13):
        best = min((i for i in range(12) if i not in chosen),
                   key=lambda i: float(((mean - normed[chosen + [i]].mean(0)) ** 2).sum()))
        chosen.append(best)
        expected.append(best)
    assert herding_order(feats) == expected
    assert sorted(expected) == list(range(12))


def test_herding_prefix_approximates_the_mean_better_than_random():
    torch.manual_seed(1)
    feats = F.normalize(torch.randn(200, 16) + 0.5, dim=1)
    mean = feats.mean(0)
    herd = herding_order(feats)[:10]
    herd_error = float((feats[herd].mean(0) - mean).norm())
    random_errors = [float((feats[torch.randperm(200)[:10]].mean(0) - mean).norm()) for _ in range(20)]
    assert herd_error < min(random_errors)


def test_quotas():
    assert class_quotas(3, total=10, per_class=None) == [4, 3, 3]
    assert class_quotas(4, total=None, per_class=5) == [5, 5, 5, 5]
    assert class_quotas(2, total=None, per_class=None) == [0, 0]


def test_fixed_total_budget_shrinks_old_classes_by_truncation():
    memory = ExemplarMemory(total=12, per_class=None)
    memory.add_classes(0, {0: list(range(100, 110)), 1: list(range(200, 210))})
    assert len(memory) == 12 and memory.exemplars[0] == (0, list(range(100, 106)))
    memory.add_classes(1, {2: list(range(300, 310)), 3: list(range(400, 410))})
    assert len(memory) == 12
    assert memory.exemplars[0] == (0, [100, 101, 102])  # the best-ranked survive
    assert memory.exemplars[3] == (1, [400, 401, 402])
    clone = ExemplarMemory(total=12, per_class=None)
    clone.load_state_dict(memory.state_dict())
    assert clone.exemplars == memory.exemplars


def test_per_class_budget_grows_with_the_classes():
    memory = ExemplarMemory(total=None, per_class=2)
    for exp, labels in enumerate([(0, 1), (2, 3), (4, 5)]):
        memory.add_classes(exp, {c: [10 * c + i for i in range(5)] for c in labels})
    assert len(memory) == 12 and all(len(v) == 2 for _, v in memory.exemplars.values())
