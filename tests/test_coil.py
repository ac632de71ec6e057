"""Coil's mathematics: its Sinkhorn against POT's (the library PILOT's coil.py calls), the
prototypes against numpy, both transports against PILOT's solving_ot and solving_ot_to_old
written out in numpy and POT, one step's loss against its definition, the refresh schedule;
and whole runs with both prototype sources."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import ot
import pytest
import torch
from torch.nn import functional as F

from incremental.strategies.coil import (Coil, FeatureKeepingCosineClassifier, class_prototypes, cosine_scores,
                                         rows_for_new_classes, rows_for_old_classes, sinkhorn)
from incremental.strategies.options import CoilConfig


def _pot(a: np.ndarray, b: np.ndarray, cost: np.ndarray, reg: float) -> np.ndarray:
    with warnings.catch_warnings():  # unequal masses never converge: POT warns, as in PILOT's runs
        warnings.simplefilter("ignore")
        return ot.sinkhorn(a, b, cost, reg)


@pytest.mark.parametrize("n_old, n_new, mass", [(4, 2, "pilot"), (6, 2, "pilot"), (3, 3, "equal")])
def test_sinkhorn_is_pots(n_old, n_new, mass):
    """PILOT's marginals (each class 1 / n_old, so unequal masses: all 1,000 iterations) and
    equal ones (stopped by the tolerance): the plan equals POT's ot.sinkhorn."""
    rng = np.random.default_rng(n_old)
    cost = rng.uniform(0.2, 2.0, (n_old, n_new))
    a = np.full(n_old, 1 / n_old)
    b = np.full(n_new, 1 / (n_old if mass == "pilot" else n_new))
    ours = sinkhorn(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(cost), 0.464).numpy()
    np.testing.assert_allclose(ours, _pot(a, b, cost, 0.464), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ours.sum(1), a, rtol=1e-10)  # the last half-step fits the rows
    if mass == "equal":
        np.testing.assert_allclose(ours.sum(0), b, atol=1e-8)


def test_sinkhorn_undoes_a_step_that_overflows_as_pot_does():
    cost = np.array([[0.0, 50.0], [50.0, 0.0]])
    a = b = np.array([0.5, 0.5])
    ours = sinkhorn(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(cost), 0.01).numpy()
    np.testing.assert_allclose(ours, _pot(a, b, cost, 0.01), rtol=1e-10, atol=1e-300)


def test_prototypes_are_normalised_means_of_normalised_features():
    rng = np.random.default_rng(0)
    features, labels = rng.standard_normal((9, 5)).astype(np.float32), np.array([0, 1, 2] * 3)
    unit = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-8)
    means = np.stack([unit[labels == c].mean(0) for c in (1, 2)])
    expected = means / np.linalg.norm(means, axis=1, keepdims=True)
    ours = class_prototypes(torch.from_numpy(features), torch.from_numpy(labels), range(1, 3))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _setting(n_old: int, n_new: int, width: int = 6):
    rng = np.random.default_rng(n_old + n_new)
    old_p, new_p = _unit(rng.standard_normal((n_old, width))), _unit(rng.standard_normal((n_new, width)))
    return old_p, new_p, rng.standard_normal((n_old, width)).astype(np.float32), \
        rng.standard_normal((n_new, width)).astype(np.float32)


def test_the_new_rows_are_pilots_solving_ot():
    """``n_old gamma P^T normalise(W_old)``, P POT's plan from the old prototypes to the new
    under the 3-norm cost, gamma matching the rows' mean norm to the old rows'."""
    config = CoilConfig()
    old_p, new_p, old_rows, _ = _setting(4, 2)
    cost = np.array([[np.sum(np.abs(o - n) ** 3) ** (1 / 3) for n in new_p] for o in old_p])
    plan = _pot(np.full(4, 1 / 4), np.full(2, 1 / 4), cost, config.sinkhorn_reg).astype(np.float32)
    hat = plan.T @ _unit(old_rows) * 4
    gamma = np.linalg.norm(old_rows, axis=1).mean() / np.linalg.norm(hat, axis=1).mean()
    rows, ours_gamma = rows_for_new_classes(torch.from_numpy(old_p), torch.from_numpy(new_p),
                                            torch.from_numpy(old_rows), config)
    np.testing.assert_allclose(rows.numpy(), hat * gamma, rtol=1e-5, atol=1e-7)
    assert ours_gamma == pytest.approx(gamma, rel=1e-6)
    assert rows.norm(dim=1).mean() == pytest.approx(float(np.linalg.norm(old_rows, axis=1).mean()), rel=1e-6)


def test_the_old_rows_are_pilots_solving_ot_to_old():
    """``n_old gamma P^T normalise(W_new)``, P POT's plan from the new prototypes to the old
    (marginals 1 / n_old, the cost plus 1e-8)."""
    config = CoilConfig(cost_norm=2.0)
    old_p, new_p, _, new_rows = _setting(6, 2)
    cost = np.sqrt(((new_p[:, None] - old_p[None]) ** 2).sum(-1)) + 1e-8
    plan = _pot(np.full(2, 1 / 6), np.full(6, 1 / 6), cost, config.sinkhorn_reg).astype(np.float32)
    expected = plan.T @ _unit(new_rows) * 6 * 1.7
    ours = rows_for_old_classes(torch.from_numpy(new_p), torch.from_numpy(old_p), torch.from_numpy(new_rows),
                                1.7, config)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-7)


def _soft_ce(student: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    return -(F.softmax(target / t, 1) * F.log_softmax(student / t, 1)).sum(1).mean()


def _step(epoch: int):
    """One batch of experience 1 (old classes 0-1, new 2-3) through a cosine head on a linear body."""
    torch.manual_seed(epoch)
    body = torch.nn.Linear(5, 6)
    head = FeatureKeepingCosineClassifier(6, 4)
    head.sigma.data.fill_(3.0)
    head.masking = False  # no Avalanche adaptation here: every unit is live
    teacher = torch.nn.Linear(5, 2)
    plugin = Coil.__new__(Coil)
    plugin.config = CoilConfig(new_branch_weight=0.5, old_branch_weight=0.7)
    plugin.context = SimpleNamespace(class_split=SimpleNamespace(label_ranges=lambda: [range(0, 2), range(2, 4)]))
    plugin.teacher, plugin.gamma = teacher, 1.0
    plugin.new_branch, plugin.old_branch = torch.randn(2, 6), torch.randn(2, 6)
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 2, 3, 2, 3])
    head.train()
    features = body(x)
    logits = head(features)
    strategy = SimpleNamespace(model=SimpleNamespace(head=head), mb_x=x, mb_output=logits,
                               loss=F.cross_entropy(logits, y), train_epochs=4,
                               clock=SimpleNamespace(train_exp_epochs=epoch),
                               experience=SimpleNamespace(current_experience=1))
    plugin.before_backward(strategy)
    return plugin, strategy, features, logits, y


def test_the_first_epochs_loss_is_pilots():
    """``(old / seen) KD + (1 - old / seen) CE + w_new CE(softmax(cos(f, W_ot) / T), log_softmax(z_new / T))``."""
    plugin, strategy, features, logits, y = _step(epoch=0)
    teacher = plugin.teacher(strategy.mb_x)
    scores = F.normalize(features, dim=1) @ F.normalize(plugin.new_branch, dim=1).T
    expected = 0.5 * _soft_ce(logits[:, :2], teacher, 2.0) + 0.5 * F.cross_entropy(logits, y) \
        + 0.5 * _soft_ce(logits[:, 2:], scores, 2.0)
    torch.testing.assert_close(strategy.loss, expected)
    assert strategy.model.head.kept is None  # cleared, so the teacher's deep copy holds no graph


def test_a_later_epochs_loss_is_pilots():
    """The old branch from the second epoch: ``w_old (e / E)^2 CE(softmax(z_old^teacher / T),
    log_softmax(cos(f, W_back) / T))``."""
    plugin, strategy, features, logits, y = _step(epoch=2)
    teacher = plugin.teacher(strategy.mb_x)
    scores = cosine_scores(features, plugin.old_branch)
    expected = 0.5 * _soft_ce(logits[:, :2], teacher, 2.0) + 0.5 * F.cross_entropy(logits, y) \
        + 0.7 * (2 / 4) ** 2 * _soft_ce(scores, teacher, 2.0)
    torch.testing.assert_close(strategy.loss, expected)
    strategy.loss.backward()  # the features' gradient reaches the body through the kept input


@pytest.mark.parametrize("epoch, iteration, refreshed", [(0, 0, False), (1, 0, True), (1, 2, False), (2, 3, True),
                                                         (3, 6, True)])
def test_the_old_rows_are_refreshed_from_the_second_epoch_every_k_iterations(epoch, iteration, refreshed):
    plugin = Coil.__new__(Coil)
    plugin.config = CoilConfig(refresh_every=3)
    plugin.context = SimpleNamespace(class_split=SimpleNamespace(label_ranges=lambda: [range(0, 2), range(2, 4)]))
    plugin.gamma, plugin.old_branch = 1.0, None
    calls = []
    plugin.prototypes = lambda strategy, experiences, source: calls.append(source) or torch.eye(4)[
        [0, 1] if experiences.start == 0 else [2, 3]]
    head = FeatureKeepingCosineClassifier(4, 4)
    strategy = SimpleNamespace(model=SimpleNamespace(head=head), experience=SimpleNamespace(current_experience=1),
                               clock=SimpleNamespace(train_exp_epochs=epoch, train_epoch_iterations=iteration))
    plugin.before_training_iteration(strategy)
    assert (plugin.old_branch is not None) == refreshed
    assert calls == (["memory", "all_data"] if refreshed else [])


@pytest.mark.parametrize("source", ["all_data", "memory"])
def test_a_run_trains_with_memory_a_teacher_and_transported_rows(tiny_config, tmp_path, source):
    from incremental.cli import main

    code = main(["run", str(tiny_config), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", f"strategy={{name: coil, old_prototypes: {source}, refresh_every: 1}}",
                 "--set", "protocol.memory={total: 30}", "--set", "training.epochs=2",
                 "--set", "output.tensorboard=false"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["memory"][-1]["exemplars"] == 30
    assert all(np.isfinite(loss) for losses in metrics["train_loss_per_epoch"] for loss in losses)
