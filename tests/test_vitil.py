"""ViTIL's ingredients, each checked for what it claims: the conv stem, the head LR groups at
every experience, the balanced set, logit KD, old head rows kept when the head grows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from avalanche.core import SupervisedPlugin

from incremental.config import Component, load_config
from incremental.data import build_dataset
from incremental.errors import ConfigError
from incremental.training.finetune import balanced_finetune
from incremental.losses import logit_distillation
from incremental.models.net import build_model
from incremental.models.vit import ViTConfig, build_vit, stem_channels, stem_strides
from incremental.protocol import build_benchmark, make_class_split
from incremental.registry import STRATEGIES
from incremental.run import run
from incremental.strategies.vitil import ViTIL, ViTILConfig
from incremental.strategy import StrategyContext

# ------------------------------------------------------------------------- conv stem


def test_stem_strides_multiply_to_the_patch_size():
    assert stem_strides(16) == [2, 2, 2, 2]
    assert stem_strides(4) == [2, 2]
    assert stem_strides(14) == [2, 7]
    assert stem_strides(1) == []
    assert stem_channels(384, 4) == [48, 96, 192, 384]  # Xiao et al.'s ViT_C-4GF
    assert stem_channels(192, 4) == [24, 48, 96, 192]   # ViT_C-1GF


@pytest.mark.parametrize("patch,size,embed", [(4, 32, 48), (16, 64, 64), (14, 28, 32)])
def test_conv_stem_vit_keeps_the_token_grid_and_trains_the_stem(patch, size, embed):
    vit = build_vit(ViTConfig(patch_size=patch, embed_dim=embed, depth=1, num_heads=4, stem="conv"),
                    in_chans=3, img_size=size)
    convs = [m for m in vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs[:-1]] == stem_strides(patch)
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == embed
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in vit.patch_embed.proj)
    tokens = vit.forward_features(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, (size // patch) ** 2 + 1, embed)
    pooled = vit.forward_head(tokens, pre_logits=True)
    (pooled * torch.randn_like(pooled)).sum().backward()  # a plain sum of a LayerNorm output has no gradient
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0


def test_patchify_stem_stays_the_default():
    vit = build_vit(ViTConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2), in_chans=1, img_size=16)
    assert isinstance(vit.patch_embed.proj, torch.nn.Conv2d) and vit.patch_embed.proj.stride == (4, 4)


def test_conv_stem_options_are_checked():
    with pytest.raises(ConfigError, match="stem_channels"):
        build_vit(ViTConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2, stem="conv", stem_channels=[8, 16, 32]),
                  in_chans=1, img_size=16)
    with pytest.raises(ConfigError) as info:
        ViTConfig(stem="patch", stem_channels=[8]).validate()
    assert info.value.key == "stem_channels"


# ------------------------------------------------------------------------- distillation


def test_kd_is_zero_when_student_and_teacher_agree_and_ignores_new_outputs():
    teacher = torch.randn(8, 5)
    student = torch.cat([teacher, torch.randn(8, 3) * 10], dim=1)  # 3 new-class outputs
    assert logit_distillation(student, teacher, temperature=2.0).abs() < 1e-6
    other = torch.randn(8, 8, requires_grad=True)
    loss = logit_distillation(other, teacher, temperature=2.0)
    assert loss > 0
    loss.backward()
    assert other.grad[:, 5:].abs().sum() == 0 and other.grad[:, :5].abs().sum() > 0
    # T^2 * KL(p_teacher || p_student) at temperature T, by hand
    p = torch.softmax(teacher / 2, dim=1)
    q = torch.log_softmax(other.detach()[:, :5] / 2, dim=1)
    manual = 4 * (p * (p.log() - q)).sum(dim=1).mean()
    assert logit_distillation(other.detach(), teacher, 2.0) == pytest.approx(float(manual), rel=1e-5)


# ------------------------------------------------------------------------- balanced finetuning


def _tiny_benchmark():
    cfg, _ = load_config("digits_b0_5steps", ["dataset.image_size=16"])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    return cfg, splits, split, build_benchmark(splits, split)


@pytest.mark.parametrize("params", ["head", "all"])
def test_balanced_finetune_trains_what_it_says(params):
    cfg, splits, split, benchmark = _tiny_benchmark()
    model = build_model(Component("vit", ViTConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2)),
                        in_chans=1, img_size=16, initial_classes=2)
    data = benchmark.train_stream[0].dataset.subset(range(32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = balanced_finetune(model, data, epochs=2, lr=1e-2, batch_size=16, params=params,
                               optimizer=cfg.training.optimizer, device="cpu", seed=0)
    assert len(losses) == 2 and all(l > 0 for l in losses)
    after = model.state_dict()
    head_changed = not torch.equal(before["head.classifier.weight"], after["head.classifier.weight"])
    body_changed = not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    assert head_changed
    assert body_changed == (params == "all")
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone
    assert model.training


def test_a_nan_in_balanced_finetuning_stops_it_naming_the_epoch_and_key():
    """The loss is summed on the device and checked once per epoch; a NaN still stops the pass."""
    from incremental.errors import UserError

    cfg, splits, split, benchmark = _tiny_benchmark()
    model = build_model(Component("vit", ViTConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2)),
                        in_chans=1, img_size=16, initial_classes=2)
    model.head.active_units.fill_(1)  # both classes seen: their logits are not masked
    with torch.no_grad():
        model.backbone.norm.weight[0] = float("nan")
    with pytest.raises(UserError, match="balanced-finetuning loss.*in epoch 1") as info:
        balanced_finetune(model, benchmark.train_stream[0].dataset.subset(range(32)), epochs=2, lr=1e-2,
                          batch_size=16, params="all", optimizer=cfg.training.optimizer, device="cpu", seed=0)
    assert info.value.key == "strategy.balanced_finetuning.lr_scale"
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone on the way out


# ------------------------------------------------------------------------- one run, every check

TINY_VITIL = """
name: tiny_vitil
seed: 3
dataset: {name: digits, image_size: 16}
protocol: {initial_classes: 4, increment: 3, class_order: random, memory: {total: 30}}
backbone: {name: vit, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg,
           drop_path_rate: 0.0, stem: conv}
strategy:
  name: test_vitil_recorder
  head_lr_scale: 10.0
  head_weight_decay: 0.0
  balanced_finetuning: {epochs: 2}
  distillation: {temperature: 2.0, weight: 1.0}
training:
  epochs: 2
  batch_size: 16
  optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.05}
"""


class _Recorder(SupervisedPlugin):
    """Test-only: what the optimizer and the head look like at every experience."""

    def __init__(self, vitil: ViTIL):
        super().__init__()
        self.vitil = vitil
        self.groups: list[list[dict[str, Any]]] = []
        self.lr_ratios: list[float] = []
        self.head_rows: list[torch.Tensor] = []
        self.kept_rows: list[bool] = []
        self.balanced_counts: list[dict[int, int]] = []

    def before_training_epoch(self, strategy, **kwargs):
        # the first epoch: the optimizer of this experience is built by then (OptimizationPlugin
        # runs after the strategies' before_training_exp)
        if strategy.clock.train_exp_epochs:
            return
        names = {id(p): n for n, p in strategy.model.named_parameters()}
        self.groups.append([{"name": g["name"], "base_lr": g["base_lr"], "weight_decay": g["weight_decay"],
                             "params": sorted(names[id(p)] for p in g["params"]),
                             "shapes": [tuple(p.shape) for p in g["params"]]}
                            for g in strategy.optimizer.param_groups])
        if self.head_rows:  # the head has grown by now: the old rows must be unchanged
            old = self.head_rows[-1]
            self.kept_rows.append(torch.equal(strategy.model.head.classifier.weight[: len(old)].detach(), old))

    def after_training_iteration(self, strategy, **kwargs):
        by_name = {g["name"]: g["lr"] for g in strategy.optimizer.param_groups}
        self.lr_ratios.append(by_name["head_decay"] / by_name["decay"])

    def after_training_exp(self, strategy, **kwargs):
        self.head_rows.append(strategy.model.head.classifier.weight.detach().clone())
        if strategy.experience.current_experience > 0:
            targets = self.vitil.balanced_set().targets
            self.balanced_counts.append({int(t): list(targets).count(t) for t in set(targets)})


RECORDERS: list[_Recorder] = []


@STRATEGIES.register("test_vitil_recorder", config=ViTILConfig)
def _vitil_with_recorder(config: ViTILConfig, context: StrategyContext) -> list[Any]:
    """Test-only: vitil, followed by a plugin that records what the tests check."""
    vitil = ViTIL(config, context)
    RECORDERS.append(_Recorder(vitil))
    return [vitil, RECORDERS[-1]]


def test_vitil_ingredients_in_one_run(write_yaml, tmp_path):
    cfg, _ = load_config(str(write_yaml(TINY_VITIL)))
    metrics = run(cfg, tmp_path / "run", quiet=True)
    rec = RECORDERS[-1]
    assert metrics["status"] == "complete"

    # head LR: at every experience, the head's groups hold exactly the (grown) head, at 10x the
    # base LR and with its own weight decay; every other parameter is in a body group at 1x.
    seen = [4, 7, 10]
    all_names = {n for n, _ in build_model(cfg.backbone, in_chans=1, img_size=16, initial_classes=4).named_parameters()}
    for exp, groups in enumerate(rec.groups):
        by_name = {g["name"]: g for g in groups}
        assert set(by_name) == {"decay", "no_decay", "head_decay", "head_no_decay"}
        assert by_name["head_decay"]["params"] == ["head.classifier.weight"]
        assert by_name["head_decay"]["shapes"] == [(seen[exp], 32)]
        assert by_name["head_no_decay"]["params"] == ["head.classifier.bias"]
        assert by_name["head_decay"]["base_lr"] == pytest.approx(1e-2)
        assert by_name["head_no_decay"]["base_lr"] == pytest.approx(1e-2)
        assert by_name["decay"]["base_lr"] == pytest.approx(1e-3)
        assert by_name["no_decay"]["base_lr"] == pytest.approx(1e-3)
        assert by_name["head_decay"]["weight_decay"] == 0.0 and by_name["decay"]["weight_decay"] == 0.05
        names = [n for g in groups for n in g["params"]]
        assert len(names) == len(set(names)) and set(names) == all_names  # each parameter once
    assert rec.lr_ratios and all(r == pytest.approx(10.0) for r in rec.lr_ratios)  # through the schedule

    # the head grows without touching the old classes' rows (nothing trains in between)
    assert rec.kept_rows == [True, True]

    # balanced set: the updated memory, equal per class (30 exemplars over 7, then 10 classes)
    assert [sorted(c.values()) for c in rec.balanced_counts] == [[4, 4, 4, 4, 4, 5, 5], [3] * 10]
    assert [sorted(c) for c in rec.balanced_counts] == [list(range(7)), list(range(10))]

    # the diagnostics are in metrics.json
    assert len(metrics["train_loss_per_epoch"][0]) == 2
    assert [sum(r) for r in metrics["prediction_matrix"][-1]] == metrics["test_samples_per_experience"]
    assert metrics["head_norm_ratio"][0] is None and metrics["head_norm_ratio"][1] > 0
    assert 0 <= metrics["old_predicted_as_new"][2] <= 100
    assert rec.vitil.teacher is not None and not any(p.requires_grad for p in rec.vitil.teacher.parameters())


def test_vitil_with_every_ingredient_off_is_replay(tiny_config, tmp_path):
    off = ["strategy={name: vitil, head_lr_scale: 1.0, balanced_finetuning: {enabled: false}, "
           "distillation: {enabled: false}}", "training.epochs=2"]
    cfg_vitil, _ = load_config(str(tiny_config), off)
    cfg_replay, _ = load_config(str(tiny_config), ["training.epochs=2"])
    a = run(cfg_vitil, tmp_path / "vitil", quiet=True)
    b = run(cfg_replay, tmp_path / "replay", quiet=True)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["train_loss"] == b["train_loss"]


def test_balanced_finetuning_without_memory_names_the_protocol_key(tiny_config, tmp_path):
    cfg, _ = load_config(str(tiny_config), ["strategy=vitil", "protocol.memory={total: 0}"])
    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path / "r", quiet=True)
    assert info.value.key == "protocol.memory" and "vitil" in str(info.value)
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_typo_in_a_nested_vitil_option_is_one_line_naming_the_key(capsys):
    from incremental.cli import main

    assert main(["check", "digits_b0_5steps", "--no-data", "--set", "strategy=vitil",
                 "--set", "strategy.balanced_finetuning.epoch=3"]) == 2
    assert capsys.readouterr().err.strip() == ("--set strategy.balanced_finetuning.epoch=3: "
                                               "strategy.balanced_finetuning.epoch: unknown key (did you mean 'epochs'?)")
