"""The optimizer plugin: fresh state per experience, every parameter in a group, LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate

from incremental.config import OptimizerConfig, SchedulerConfig, TrainingConfig, parse_dataclass
from incremental.data import build_dataset
from incremental.data.synthetic import SyntheticConfig
from incremental.models.net import build_model
from incremental.config import Component
from incremental.models.vit import ViTConfig
from incremental.training.optim import lr_factor, param_groups
from incremental.training.plugins import OptimizationPlugin, silent_evaluator
from incremental.protocol import build_benchmark, make_class_split
from incremental.config import ProtocolConfig


def test_lr_schedules():
    cosine = SchedulerConfig(name="cosine", warmup_epochs=1)
    assert lr_factor(cosine, iteration=0, iters_per_epoch=10, epochs=3) == pytest.approx(0.1)
    assert lr_factor(cosine, iteration=9, iters_per_epoch=10, epochs=3) == pytest.approx(1.0)
    assert lr_factor(cosine, iteration=20, iters_per_epoch=10, epochs=3) == pytest.approx(0.5)
    assert lr_factor(cosine, iteration=29, iters_per_epoch=10, epochs=3) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 19 / 20)))
    step = SchedulerConfig(name="step", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(step, iteration=i * 10, iters_per_epoch=10, epochs=5) for i in range(5)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor(SchedulerConfig(name="constant"), iteration=7, iters_per_epoch=3, epochs=4) == 1.0


def test_the_epoch_quarter_cosine_is_codas_and_infloras_schedule():
    """CODA-Prompt's and InfLoRA's CosineSchedule: base x cos(99 pi e / (200 (K - 1))) for epoch
    e of K, set once an epoch (its step() after each epoch), so constant within one; from 1
    down to cos(99 pi / 200) in the last epoch, never 0; one epoch keeps the LR."""
    quarter = SchedulerConfig(name="epoch_quarter_cosine")
    factors = [lr_factor(quarter, iteration=i, iters_per_epoch=3, epochs=4) for i in range(12)]
    per_epoch = [math.cos(99 * math.pi * e / (200 * 3)) for e in range(4)]
    assert factors == pytest.approx([f for f in per_epoch for _ in range(3)])
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(math.cos(99 * math.pi / 200)) and factors[-1] > 0
    assert lr_factor(quarter, iteration=5, iters_per_epoch=3, epochs=1) == 1.0


def test_the_epoch_cosine_is_torchs_cosine_annealing_stepped_once_an_epoch():
    """PILOT's learners: CosineAnnealingLR(T_max=epochs), its step() after each epoch: constant
    within an epoch, following torch's own scheduler (with and without a floor)."""
    for floor in (0.0, 0.1):
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([parameter], lr=2.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5, eta_min=2.0 * floor)
        torch_lrs = []
        for _ in range(5):
            torch_lrs += [optimizer.param_groups[0]["lr"]] * 4
            optimizer.step()
            scheduler.step()
        ours = SchedulerConfig(name="epoch_cosine", min_lr_ratio=floor)
        assert [2.0 * lr_factor(ours, iteration=i, iters_per_epoch=4, epochs=5) for i in range(20)] == \
            pytest.approx(torch_lrs)


def tiny_vit(classes: int):
    spec = Component("vit", ViTConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2))
    return build_model(spec, in_chans=3, img_size=8, initial_classes=classes)


def test_no_weight_decay_on_tokens_norms_and_biases():
    model = tiny_vit(3)
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed", "head.classifier.bias"} <= no_decay
    assert "head.classifier.weight" in {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_weight_decay_on_all_steps_as_an_sgd_over_model_parameters():
    """``weight_decay_on: all``: one SGD step equals PILOT's ``SGD(model.parameters(), ...)`` bit
    for bit, biases, norms and tokens decayed too; the default leaves them undecayed."""
    from incremental.config import OptimizerConfig
    from incremental.training.optim import build_optimizer

    torch.manual_seed(0)
    ours, reference = tiny_vit(3), tiny_vit(3)
    reference.load_state_dict(ours.state_dict())
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    cfg = OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.5, momentum=0.9, weight_decay_on="all")
    optimizers = [build_optimizer(ours, cfg, 0.1),
                  torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)]
    assert [g["name"] for g in optimizers[0].param_groups] == ["decay"]
    for model, optimizer in zip((ours, reference), optimizers):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert torch.equal(mine, theirs), name
    default = build_optimizer(tiny_vit(3), OptimizerConfig(name="sgd", weight_decay=0.5), 0.1)
    assert {g["name"]: g["weight_decay"] for g in default.param_groups} == {"decay": 0.5, "no_decay": 0.0}


class OptimizerSpy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.seen = []

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == 0:
            opt = strategy.optimizer
            grouped = [p for g in opt.param_groups for p in g["params"]]
            self.seen.append({
                "state_entries": len(opt.state),
                "all_params_once": sorted(map(id, grouped)) == sorted(id(p) for p in strategy.model.parameters()),
                "head_outputs": strategy.model.num_classes,
                "lr": [g["lr"] for g in opt.param_groups],
                "weight_decay": [g["weight_decay"] for g in opt.param_groups],
            })


def test_fresh_optimizer_per_experience_covers_the_grown_head():
    data = build_dataset("synthetic", SyntheticConfig(num_classes=6, train_per_class=8, test_per_class=2,
                                                      image_size=8))
    split = make_class_split(parse_dataclass(ProtocolConfig, {"increment": 3}), 6, seed=0)
    bench = build_benchmark(data, split)
    model = tiny_vit(3)
    training = TrainingConfig(epochs=2, optimizer=OptimizerConfig(name="adamw", lr=0.01, initial_lr=0.05,
                                                                       weight_decay=0.02, initial_weight_decay=0.3),
                              scheduler=SchedulerConfig(name="constant"))
    spy = OptimizerSpy()
    template = SupervisedTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  train_mb_size=16, train_epochs=2, eval_mb_size=16,
                                  plugins=[OptimizationPlugin(training), spy], evaluator=silent_evaluator())
    for exp in bench.train_stream:
        template.train(exp, eval_streams=[], reset_optimizer_state=True)
    assert [s["state_entries"] for s in spy.seen] == [0, 0]  # no AdamW moments carried over
    assert all(s["all_params_once"] for s in spy.seen)
    assert [s["head_outputs"] for s in spy.seen] == [3, 6]
    assert spy.seen[0]["lr"] == pytest.approx([0.05, 0.05]) and spy.seen[1]["lr"] == pytest.approx([0.01, 0.01])
    # PyCIL's init_weight_decay: the first experience's, then weight_decay; no decay stays none
    assert spy.seen[0]["weight_decay"] == [0.3, 0.0] and spy.seen[1]["weight_decay"] == [0.02, 0.0]
