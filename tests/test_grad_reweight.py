"""Gradient reweighting's mathematics: the class-balance factors and the distillation against
PILOT's formulas in numpy, the classifier gradient of one step against its definition, the
logit-adjusted loss; and a whole run with its memory and teacher."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from incremental.losses import soft_target_cross_entropy as distillation
from incremental.strategies.grad_reweight import GradientReweighting, class_balance_weights


def _pilot_weights(gradall: np.ndarray, known: int, gamma: float) -> np.ndarray:
    """PILOT's models/dgr.py: grad_weight after rs_old and rs_new."""
    if known == 0:
        return np.min(gradall) / gradall
    old, new = gradall[:known], gradall[known:]
    weights = np.concatenate([np.min(old) / old, np.min(new) / new])
    rs_old = min(1.0, np.mean(new) / np.mean(old))
    rs_new = min(1.0, np.mean(new) / np.mean(old) * np.exp(-gamma * known / len(gradall)))
    weights[:known] *= rs_old
    weights[known:] *= rs_new
    return weights


@pytest.mark.parametrize("known, scale", [(0, 1.0), (4, 0.5), (4, 3.0)])
def test_the_class_balance_factors_are_pilots(known, scale):
    rng = np.random.default_rng(known)
    gradall = rng.uniform(0.5, 2.0, 7)
    gradall[known:] *= scale  # new classes pushing less (0.5) or more (3) than the old
    ours = class_balance_weights(torch.from_numpy(gradall), known, gamma=1.0).numpy()
    np.testing.assert_allclose(ours, _pilot_weights(gradall, known, 1.0), rtol=1e-12)
    assert ours.max() <= 1.0


def test_the_distillation_is_pilots_kd_loss():
    rng = np.random.default_rng(1)
    logits, teacher = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    soft = np.exp(teacher / 2) / np.exp(teacher / 2).sum(1, keepdims=True)
    log_pred = logits / 2 - np.log(np.exp(logits / 2).sum(1, keepdims=True))
    expected = -(soft * log_pred).sum() / 5
    assert float(distillation(torch.from_numpy(logits), torch.from_numpy(teacher), 2.0)) == pytest.approx(expected)


def _plugin(old: int, seen: int, teacher: torch.nn.Module | None) -> GradientReweighting:
    plugin = GradientReweighting.__new__(GradientReweighting)
    plugin.config = SimpleNamespace(gamma=1.0, temperature=2.0, kd_weight=1.0, logit_adjustment=True, kd_gradient_floor=0.0)
    ranges = [range(0, old), range(old, seen)] if old else [range(0, seen)]
    plugin.context = SimpleNamespace(class_split=SimpleNamespace(label_ranges=lambda: ranges))
    plugin.teacher = teacher
    plugin.accumulated = torch.zeros(seen, dtype=torch.float64)
    plugin.log_prior = torch.log(torch.tensor([0.1, 0.1, 0.4, 0.4]))
    plugin._head_gradients = None
    return plugin


def test_one_steps_classifier_gradient_is_the_reweighted_one():
    """Old rows: w_c g_CE + r g_KD; new rows: w_c g_CE; the body: the whole loss's gradient."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)
    model = SimpleNamespace(head=SimpleNamespace(classifier=head))
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 2))
    plugin = _plugin(old=2, seen=4, teacher=teacher)
    plugin.accumulated += torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)  # earlier steps
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 2, 3, 2, 3])
    logits = head(torch.relu(body(x)))
    loss = plugin.adjusted_cross_entropy(logits, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits + plugin.log_prior, y))
    engine = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))
    strategy = SimpleNamespace(model=model, loss=loss, mb_output=logits, mb_x=x, engine=engine,
                               experience=SimpleNamespace(current_experience=1))
    plugin.before_backward(strategy)
    strategy.loss.backward()
    plugin.after_backward(strategy)
    # the definition, by hand
    g_ce = torch.autograd.grad(F.cross_entropy(head(torch.relu(body(x))) + plugin.log_prior, y), head.weight)[0]
    kd = distillation(head(torch.relu(body(x)))[:, :2], teacher(x), 2.0)
    g_kd = torch.autograd.grad(kd, head.weight, retain_graph=True)[0]
    norms = g_ce.norm(dim=1).double()
    accumulated = np.array([1.0, 2.0, 0.5, 1.5]) + norms.numpy()
    weights = torch.from_numpy(_pilot_weights(accumulated, 2, 1.0)).float()
    ratio = (weights * norms.float()).norm() / g_kd[:2].norm(dim=1).norm()
    expected = weights[:, None] * g_ce
    expected[:2] += ratio * g_kd[:2]
    torch.testing.assert_close(head.weight.grad, expected, rtol=1e-5, atol=1e-7)
    body_grad = torch.autograd.grad(F.cross_entropy(head(torch.relu(body(x))) + plugin.log_prior, y) + 2 / 2 * kd,
                                    body.weight)[0]
    torch.testing.assert_close(body.weight.grad, body_grad, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(plugin.accumulated.sum()), float(accumulated.sum()), rel_tol=1e-9)


def test_a_kd_gradient_of_round_off_is_left_out_above_the_floor():
    """At an experience's first step the teacher is the student's old part: the KD gradient is
    (near) zero, and with ``kd_gradient_floor`` the old rows take the reweighted CE alone, where
    PILOT's ratio would scale the round-off up to the CE gradient's size."""
    torch.manual_seed(1)
    body, head = torch.nn.Linear(6, 5), torch.nn.Linear(5, 4)
    teacher = lambda x: head(torch.relu(body(x)))[:, :2].detach()  # noqa: E731
    plugin = _plugin(old=2, seen=4, teacher=teacher)
    plugin.config.kd_gradient_floor = 1e-6
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 2, 3, 2, 3])
    logits = head(torch.relu(body(x)))
    engine = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False))
    strategy = SimpleNamespace(model=SimpleNamespace(head=SimpleNamespace(classifier=head)), mb_x=x, mb_output=logits,
                               loss=plugin.adjusted_cross_entropy(logits, y), engine=engine,
                               experience=SimpleNamespace(current_experience=1))
    plugin.before_backward(strategy)
    g_ce = torch.autograd.grad(plugin.adjusted_cross_entropy(head(torch.relu(body(x))), y), head.weight)[0]
    weights = torch.from_numpy(_pilot_weights(g_ce.norm(dim=1).double().numpy(), 2, 1.0)).float()
    torch.testing.assert_close(plugin._head_gradients[0], weights[:, None] * g_ce, rtol=1e-5, atol=1e-8)


def test_a_run_trains_with_memory_and_a_teacher(tiny_config, tmp_path):
    import json

    from incremental.cli import main

    code = main(["run", str(tiny_config), "--out", str(tmp_path / "run"), "--quiet", "--set", "strategy=grad_reweight",
                 "--set", "protocol.memory={total: 30}", "--set", "output.tensorboard=false"])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["memory"][-1]["exemplars"] == 30
