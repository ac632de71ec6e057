"""FOSTER's mathematics: the class-balanced weights and the balanced distillation against PILOT's
formulas in numpy, the boosting loss against its definition, the boosted network's features and
its head grown from the student's; and a run where the old ViT stays frozen while the student,
compressed from the boosted network, carries on."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F

from incremental.strategies.foster import (FOSTER, BoostingViT, Student, balanced_distillation,
                                           class_balanced_weights)
from incremental.strategies.options import FOSTERConfig


@pytest.mark.parametrize("beta", [0.96, 0.97])
def test_the_class_weights_are_pilots_per_cls_weights(beta):
    counts = np.array([20, 20, 20, 145, 151])
    effective = 1.0 - np.power(beta, counts)
    expected = (1.0 - beta) / effective
    expected = expected / expected.sum() * len(counts)
    ours = class_balanced_weights(torch.from_numpy(counts), beta)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)
    assert ours[0] > ours[-1]  # fewer images, more weight


def test_the_balanced_distillation_is_pilots_bkd():
    rng = np.random.default_rng(0)
    pred, soft, weights = rng.standard_normal((6, 4)), rng.standard_normal((6, 4)), rng.uniform(0.5, 2.0, 4)
    log_pred = pred / 2 - np.log(np.exp(pred / 2).sum(1, keepdims=True))
    target = np.exp(soft / 2) / np.exp(soft / 2).sum(1, keepdims=True) * weights
    target = target / target.sum(1)[:, None]
    expected = -(target * log_pred).sum() / 6
    ours = balanced_distillation(torch.from_numpy(pred), torch.from_numpy(soft), torch.from_numpy(weights), 2.0)
    assert float(ours) == pytest.approx(expected, rel=1e-10)


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=0, embed_dim=16, depth=2, num_heads=2,
                             global_pool="token")


def test_the_first_experiences_feature_is_the_vits_and_boosting_adds_the_new_one():
    vit = _vit().eval()
    original = copy.deepcopy(vit)
    boosted = BoostingViT(vit, classes=5).eval()
    x = torch.randn(3, 3, 8, 8)
    own = original.forward_head(original.forward_features(x), pre_logits=True)
    features = boosted.forward_features(x)
    assert torch.equal(features[:, :16], own) and torch.count_nonzero(features[:, 16:]) == 0
    with torch.no_grad():
        boosted.slots[1].blocks[0].mlp.fc2.weight.mul_(2.0)
    boosted.boosting.fill_(True)
    features = boosted.forward_features(x)
    second = boosted.slots[1]
    assert torch.equal(features[:, :16], own)
    assert torch.equal(features[:, 16:], second.forward_head(second.forward_features(x), pre_logits=True))
    boosted.train()
    assert not boosted.slots[0].training and boosted.slots[1].training  # the old ViT stays in eval mode


def _plugin(weights: torch.Tensor) -> FOSTER:
    plugin = FOSTER.__new__(FOSTER)
    plugin.config = FOSTERConfig(kd_weight=0.6)
    plugin.context = SimpleNamespace(class_split=SimpleNamespace(label_ranges=lambda: [range(0, 2), range(2, 5)]))
    plugin.weights = weights
    return plugin


def test_the_boosting_loss_is_pilots():
    """``CE(z / w, y) + CE(fe(f_new), y) + lambda KD(z_old, oldfc(f_old), T)``."""
    boosted = BoostingViT(_vit(), classes=5)
    boosted.boosting.fill_(True)
    boosted.train()
    head = torch.nn.Linear(32, 5)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 2])
    features = boosted.forward_features(x)
    logits = head(features)
    old_f, new_f = features[:, :16], features[:, 16:]
    weights = torch.tensor([1.5, 1.4, 0.7, 0.7, 0.7])
    plugin = _plugin(weights)
    strategy = SimpleNamespace(model=SimpleNamespace(backbone=boosted), mb_output=logits, mb_y=y,
                               loss=F.cross_entropy(logits, y), experience=SimpleNamespace(current_experience=1))
    plugin.before_backward(strategy)
    old_logits = boosted.old_head(old_f)[:, :2]
    kd = -(F.softmax(old_logits / 2, 1) * F.log_softmax(logits[:, :2] / 2, 1)).sum(1).mean()
    expected = F.cross_entropy(logits / weights, y) + F.cross_entropy(boosted.fe_head(new_f), y) + 0.6 * kd
    torch.testing.assert_close(strategy.loss, expected)
    assert boosted.kept is None and boosted.aux_outputs is None  # the graph goes with the loss


def test_boosting_starts_from_the_student():
    """Both slots hold the student's ViT; the head's old rows on the old features and the old head
    are the student's head; the rest are fresh SimpleLinear draws at twice the width."""
    boosted = BoostingViT(_vit(), classes=5)
    student = Student(copy.deepcopy(_vit()), torch.nn.Linear(16, 2))
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05)
    plugin = _plugin(None)
    plugin.student = student
    head = torch.nn.Linear(32, 5)
    with torch.no_grad():
        plugin.start_boosting(boosted, head, range(0, 2), range(2, 5))
    for slot in boosted.slots:
        assert all(torch.equal(a, b) for a, b in zip(slot.state_dict().values(), student.vit.state_dict().values()))
    assert torch.equal(head.weight[:2, :16], student.head.weight) and torch.equal(head.bias[:2], student.head.bias)
    assert torch.equal(boosted.old_head.weight[:2], student.head.weight)
    bound = (3 / 32) ** 0.5
    assert head.weight[:2, 16:].abs().max() <= bound and head.weight[2:].abs().max() <= bound
    assert torch.count_nonzero(head.bias[2:]) == 0 and torch.count_nonzero(boosted.fe_head.bias) == 0


def test_a_run_keeps_the_old_vit_frozen_and_carries_the_compressed_student(tmp_path):
    from conftest import run_tiny

    metrics = run_tiny(tmp_path, "run", "strategy={name: foster, compression_epochs: 2}", "training.epochs=1",
                       "protocol.memory={per_class: 3}", "output.checkpoint=all")
    assert metrics["status"] == "complete" and metrics["memory"][-1]["exemplars"] == 3 * 10
    first = torch.load(tmp_path / "run" / "checkpoints" / "experience_000.pt", weights_only=False)
    second = torch.load(tmp_path / "run" / "checkpoints" / "experience_001.pt", weights_only=False)
    slot0 = [k for k in first["model"] if k.startswith("backbone.slots.0.")]
    # experience 1 boosts from the first network: its old slot is that network, unchanged
    assert slot0 and all(torch.equal(first["model"][k], second["model"][k]) for k in slot0)
    student = next(s["student"] for s in second["plugins"] if isinstance(s, dict) and "student" in s)
    assert student["head.weight"].shape[0] == 7  # TINY_RUN: 4 + 3 classes seen
    moved = [k for k in student if k.startswith("vit.") and
             not torch.equal(student[k], second["model"]["backbone.slots.0." + k[len("vit."):]])]
    assert moved  # compression trained the student away from the old ViT it started as
