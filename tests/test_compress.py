"""Compressed backbones: pruning, low-rank, int8 evaluation, distillation, and the profile."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from incremental.cli import main
from incremental.config import Component, parse_dataclass
from incremental.models.options import LowRankConfig, PruneConfig
from incremental.models.compress import (FeatureDistillationPlugin, LowRankLinear, count_macs, low_rank_backbone,
                                         prune_backbone, quantize_int8)
from incremental.models.net import IncrementalNet, build_backbone
from incremental.registry import BACKBONES, load_builtins

load_builtins("backbones")

FAMILIES = {
    "vit": {"embed_dim": 64, "depth": 2, "num_heads": 4},
    "vit_conv_stem": {"embed_dim": 64, "depth": 2, "num_heads": 4, "stem": "conv"},
    "vit_dlcl": {"embed_dim": 32, "depth": 3, "num_heads": 2},
    "swin": {"embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 3, 6]},
    "resnet18": {},
    "resnet32": {"width": 8},
}


def make(family: str, size: int = 32):
    name = "vit" if family == "vit_conv_stem" else family
    entry = BACKBONES.get(name)
    return build_backbone(Component(name, parse_dataclass(entry.config_cls, FAMILIES[family])),
                          in_chans=3, img_size=size)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_shrinks_the_blocks_and_keeps_the_feature_width_and_a_growable_head(family):
    torch.manual_seed(0)
    backbone = make(family)
    x = torch.randn(2, 3, 32, 32)
    before, width = params(backbone), backbone.num_features
    report = prune_backbone(backbone, PruneConfig(ratio=0.5), x)
    assert report["groups_pruned"] > 0
    assert params(backbone) < 0.8 * before
    net = IncrementalNet(backbone, initial_classes=4)
    assert net.num_features == width
    out = net(x)
    assert out.shape == (2, 4)
    out.sum().backward()  # the pruned network still trains
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


def test_pruning_removes_the_lowest_norm_channels():
    torch.manual_seed(0)
    backbone = make("vit")
    fc1 = backbone.blocks[0].mlp.fc1
    norms = fc1.weight.norm(dim=1) ** 2 + backbone.blocks[0].mlp.fc2.weight.norm(dim=0) ** 2
    keep = set(torch.argsort(norms, descending=True)[: fc1.out_features // 2].tolist())
    kept_rows = {tuple(r.tolist()) for r in fc1.weight.detach()[sorted(keep)]}
    prune_backbone(backbone, PruneConfig(ratio=0.5), torch.randn(1, 3, 32, 32))
    after = {tuple(r.tolist()) for r in backbone.blocks[0].mlp.fc1.weight.detach()}
    # group L2 importance also counts biases; most of the top half must survive
    assert len(after & kept_rows) >= 0.8 * len(after)


def test_low_rank_at_full_rank_reproduces_the_layer_and_saves_parameters_when_low():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    full = LowRankLinear(linear, rank=48)
    torch.testing.assert_close(full(x), linear(x), atol=1e-5, rtol=1e-4)
    backbone = make("vit")
    before = params(backbone)
    report = low_rank_backbone(backbone, LowRankConfig(rank_ratio=0.25, min_features=32))
    assert report["linear_factorized"] == 8  # qkv, proj, fc1, fc2 in 2 blocks
    assert isinstance(backbone.blocks[0].attn.qkv, LowRankLinear)
    assert backbone.blocks[0].attn.qkv.rank == 16
    assert params(backbone) < 0.6 * before


def test_low_rank_energy_keeps_the_singular_values_that_hold_it():
    layer = nn.Linear(40, 40, bias=False)
    with torch.no_grad():  # singular values 10, 1, 1, ... : the first holds 10^2 / (100 + 39)
        layer.weight.copy_(torch.diag(torch.tensor([10.0] + [1.0] * 39)))
    model = nn.Sequential(layer)
    low_rank_backbone(model, LowRankConfig(energy=0.7, min_features=8))
    assert model[0].rank == 1
    model = nn.Sequential(nn.Linear(40, 40, bias=False))
    model[0].weight.data.copy_(layer.weight.data)
    low_rank_backbone(model, LowRankConfig(energy=0.75, min_features=8))
    assert model[0].rank == 6  # (100 + 5) / 139 >= 0.75 > (100 + 4) / 139


def test_macs_of_a_known_network():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))

    class Backbone(nn.Module):  # timm's contract around it
        def __init__(self):
            super().__init__()
            self.net = net

        def forward_features(self, x):
            return self.net(x)

        def forward_head(self, x, pre_logits=False):
            return x

    expected = 8 * 16 * 16 * 3 * 3 * 3 + 8 * 16 * 16 * 10
    assert count_macs(Backbone(), torch.randn(2, 3, 16, 16)) == expected


def test_int8_copy_is_smaller_and_close_and_leaves_the_model_alone():
    torch.manual_seed(0)
    backbone = make("vit").eval()
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    quantized = quantize_int8(backbone)
    a = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    b = quantized.forward_head(quantized.forward_features(x), pre_logits=True)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.98
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in state.items())


def test_distillation_trains_the_projection_not_the_teacher():
    torch.manual_seed(0)
    teacher = make("resnet32")
    student = IncrementalNet(make("vit"), initial_classes=3)
    plugin = FeatureDistillationPlugin(teacher, student.num_features, weight=1.0, loss="cosine")
    assert plugin.projection.out_features == teacher.num_features
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training

    class Strategy:  # the attributes of Avalanche's template the plugin reads
        device = torch.device("cpu")
        model = student
        mb_x = torch.randn(4, 3, 32, 32)
        loss = torch.tensor(0.0)

    plugin.before_training(Strategy)
    student.train()
    Strategy.loss = student(Strategy.mb_x).sum() * 0
    plugin.before_backward(Strategy)
    assert plugin.last_loss is not None and 0 < plugin.last_loss <= 2
    Strategy.loss.backward()
    assert plugin.projection.weight.grad.abs().sum() > 0
    assert student.backbone.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    groups = plugin.add_projection_group(student, [])
    assert groups[0]["params"] == list(plugin.projection.parameters())


def test_a_compressed_run_reports_sizes_and_evaluates_in_int8(tiny_config, tmp_path):
    out = tmp_path / "run"
    code = main(["run", str(tiny_config), "--out", str(out), "--quiet", "--set", "training.epochs=1",
                 "--set", "training.device=cpu", "--set", "protocol.increment=6",
                 "--set", "backbone.compress={prune: {ratio: 0.5}, low_rank: {rank_ratio: 0.5, min_features: 16}, "
                          "quantize: int8_dynamic}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["backbone_report"]["compression"]
    assert metrics["status"] == "complete"
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["int8"]["size_bytes"] < report["after"]["size_bytes"]
    assert all(report[k]["cpu_latency_ms"] > 0 for k in ("before", "after", "int8"))


def test_a_run_with_a_distillation_teacher_differs_from_one_without(tiny_config, tmp_path):
    losses = []
    for name, extra in (("plain", []), ("kd", ["--set", "backbone.compress.distill={teacher: {name: resnet32, "
                                                        "width: 8}, weight: 5.0}"])):
        out = tmp_path / name
        assert main(["run", str(tiny_config), "--out", str(out), "--quiet", "--set", "training.epochs=1",
                     "--set", "protocol.increment=6", *extra]) == 0
        losses.append(json.loads((out / "metrics.json").read_text())["train_loss"])
    assert losses[0] != losses[1]


def test_compress_typos_and_bad_values_name_the_key(tiny_config, capsys):
    assert main(["check", str(tiny_config), "--no-data", "--set", "backbone.compress.prune.ratio=1.5"]) == 2
    assert "backbone.compress.prune.ratio: must be < 1, got 1.5" in capsys.readouterr().err
    assert main(["check", str(tiny_config), "--no-data", "--set", "backbone.compress.quantize=int4"]) == 2
    assert "backbone.compress.quantize: expected one of 'none', 'int8_dynamic'" in capsys.readouterr().err
    assert main(["check", str(tiny_config), "--no-data", "--set", "backbone.compress.distill.teacher.name=vitt"]) == 2
    assert "did you mean 'vit'" in capsys.readouterr().err


def test_an_int8_run_saves_probes_and_reports_the_network_it_evaluated(tiny_config, tmp_path):
    """The accuracy an int8 run reports is that of the int8 copy made from model.safetensors (so the
    file plus its ``evaluated_as`` describe the evaluated network), the non-gradient probes see that
    copy in the run and in `incremental probe`, and the attack says it saw the fp32 network."""
    from safetensors import safe_open
    from torch.utils.data import DataLoader

    from conftest import load_run_model
    from incremental.models.compress import int8_copy
    from incremental.protocol import build_benchmark

    out = tmp_path / "run"
    assert main(["run", str(tiny_config), "--out", str(out), "--quiet", "--set", "training.epochs=2",
                 "--set", "training.device=cpu", "--set", "protocol.increment=6",
                 "--set", "backbone.compress={quantize: int8_dynamic}",
                 "--set", "probes=[{name: masking, num_samples: 60}, "
                          "{name: adversarial, num_samples: 8, linf_eps: [0.01], l2_eps: [], steps: 2}]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["evaluated_as"] == "int8_dynamic"
    cfg, splits, split, model, step = load_run_model(out)
    benchmark = build_benchmark(splits, split)

    def accuracies(network: torch.nn.Module) -> list[float]:
        row = []
        for experience in benchmark.test_stream:
            data = experience.dataset.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y, *_ in DataLoader(data, batch_size=256):
                    correct += int((network(x).argmax(1) == y).sum())
                    total += len(y)
            row.append(100.0 * correct / total)
        return row

    reported = metrics["accuracy_matrix"][-1]
    assert accuracies(int8_copy(model).eval()) == pytest.approx(reported, abs=1e-9)
    probes = metrics["probes"]
    assert probes["masking"][-1]["network"] == "int8_dynamic"
    assert probes["adversarial"][-1]["network"].startswith("fp32 (int8 dynamic quantization has no backward")
    # `incremental probe` rebuilds the same int8 network from the saved weights: the same numbers
    assert main(["probe", str(out), "--quiet", "--out", str(tmp_path / "p.json"),
                 "--set", "probes=[{name: masking, num_samples: 60}]"]) == 0
    offline = json.loads((tmp_path / "p.json").read_text())["probes"]["masking"]
    assert offline["network"] == "int8_dynamic" and offline["summary"] == probes["masking"][-1]["summary"]
