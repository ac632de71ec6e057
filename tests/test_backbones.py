"""The backbone zoo: timm's contract for every registered backbone, Swin/S3 windows and
sizes, DLCL's layer combination, and a digits protocol run per backbone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from incremental.cli import main
from incremental.config import Component, parse_dataclass
from incremental.errors import ConfigError
from incremental.models.net import IncrementalNet, build_backbone
from incremental.models.swin import fit_windows, stage_grids
from incremental.registry import BACKBONES, load_builtins

load_builtins("backbones")

# Options that make each backbone small enough for a CPU test; every registered name must
# appear here, so a new backbone cannot skip the contract test.
SMALL = {
    "vit": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "timm_vit": {"model": "vit_tiny_patch16_224", "patch_size": 4},
    "vit_dlcl": {"embed_dim": 32, "depth": 4, "num_heads": 2},
    "swin": {"embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 3, 6]},
    "s3_tiny": {},
    "s3_small": {},
    "s3_base": {},
    "resnet18": {},
    "resnet32": {"width": 8},
    "clip": {"model": "clip-tiny"},
}


def make(name: str, size: int = 32, in_chans: int = 3, **options) -> nn.Module:
    entry = BACKBONES.get(name)
    cfg = parse_dataclass(entry.config_cls, {**SMALL[name], **options})
    return build_backbone(Component(name, cfg), in_chans=in_chans, img_size=size)


def stem_parameter(backbone: nn.Module) -> nn.Parameter:
    """The first parameter in registration order: the patch embedding or first conv."""
    return next(p for name, p in backbone.named_parameters()
                if p.ndim == 4 or "patch_embed" in name or name.startswith(("stem", "conv1")))


def test_every_registered_backbone_has_small_test_options():
    assert set(BACKBONES.names()) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_backbone_contract(name):
    torch.manual_seed(0)
    backbone = make(name, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    features = backbone.forward_features(x)
    pooled = backbone.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, backbone.num_features)

    # head growth: Avalanche's IncrementalClassifier, as the runner grows it
    net = IncrementalNet(backbone, initial_classes=3)
    assert net(x).shape == (2, 3)
    old_rows = net.head.classifier.weight.detach().clone()
    net.head.train()
    from avalanche.benchmarks.utils import DataAttribute, _make_taskaware_classification_dataset
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.zeros(5, 1, 32, 32), torch.tensor([0, 1, 2, 3, 4]))
    dataset = _make_taskaware_classification_dataset(data, targets=DataAttribute([0, 1, 2, 3, 4], "targets"),
                                                     task_labels=0)

    class Experience:  # what IncrementalClassifier.adaptation reads
        classes_in_this_experience = [3, 4]

    Experience.dataset = dataset
    net.head.adaptation(Experience())
    assert net(x).shape == (2, 5)
    assert torch.equal(net.head.classifier.weight[:3], old_rows)

    # gradients reach the stem
    net.train()
    net(x).sum().backward()
    grad = stem_parameter(backbone).grad
    assert grad is not None and grad.abs().sum() > 0

    # state_dict round trip into a fresh instance
    net.eval()
    torch.manual_seed(1)
    other = IncrementalNet(make(name, in_chans=1), initial_classes=5).eval()
    assert not torch.allclose(other(x), net(x))
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other(x), net(x))


@pytest.mark.parametrize("size, patch, windows", [(32, 2, (4, 4, 4, 2)), (64, 4, (4, 4, 4, 2)),
                                                  (224, 4, (7, 7, 7, 7))])
def test_swin_windows_divide_every_stage_grid(size, patch, windows):
    backbone = make("swin", size=size)
    grids = stage_grids(size, patch, 4)
    got = tuple(stage.blocks[0].window_size[0] for stage in backbone.layers)
    assert got == windows
    assert all(g % w == 0 for g, w in zip(grids, got))
    assert backbone.forward_features(torch.randn(1, 3, size, size)).shape[-1] == backbone.num_features


def test_fit_windows_takes_the_largest_divisor():
    assert fit_windows([56, 28, 14, 7], (7, 7, 14, 7)) == (7, 7, 14, 7)
    assert fit_windows([16, 8, 4, 2], (7, 7, 14, 7)) == (4, 4, 4, 2)
    assert fit_windows([12, 6, 3], (8, 8, 8)) == (6, 6, 3)


def test_swin_size_errors_name_the_key():
    with pytest.raises(ConfigError, match="does not divide") as err:
        make("swin", size=64, window_size=[3])
    assert err.value.key == "backbone.window_size"
    with pytest.raises(ConfigError, match="not divisible by patch_size") as err:
        make("swin", size=40)
    assert err.value.key == "backbone.patch_size"


@pytest.mark.parametrize("name, options, timm_name", [
    ("s3_tiny", {}, "swin_s3_tiny_224"), ("s3_small", {}, "swin_s3_small_224"), ("s3_base", {}, "swin_s3_base_224"),
    ("swin", {"variant": "tiny"}, "swin_tiny_patch4_window7_224"),
    ("swin", {"variant": "small"}, "swin_small_patch4_window7_224"),
    ("swin", {"variant": "base"}, "swin_base_patch4_window7_224")])
def test_swin_and_s3_entries_at_224_are_timms_architectures(name, options, timm_name):
    """At 224 px each entry has exactly the parameters of timm's model (so timm's ImageNet
    weights load, and the papers' sizes follow: see experiments/backbones/results.md)."""
    import timm

    entry = BACKBONES.get(name)
    config = parse_dataclass(entry.config_cls, options)  # the entry's defaults, not the small ones
    ours = build_backbone(Component(name, config), in_chans=3, img_size=224).state_dict()
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_resnet18_stem_follows_the_image_size():
    small, large = make("resnet18", size=32), make("resnet18", size=224)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    assert small.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8


def test_timm_vit_takes_any_timm_vit_name_and_suggests_close_ones():
    backbone = make("timm_vit", model="deit_tiny_patch16_224", patch_size=8)
    assert backbone.patch_embed.grid_size == (4, 4)
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_patch16_224'"):
        make("timm_vit", model="vit_tiny_patch16_22")


def test_dlcl_weights_start_as_running_averages_and_stay_lower_triangular():
    backbone = make("vit_dlcl")
    depth = len(backbone.blocks)
    weights = backbone.layer_weights.detach().clone()
    for row in range(depth + 1):
        torch.testing.assert_close(weights[row, :row + 1], torch.full((row + 1,), 1 / (row + 1)))
        assert torch.all(weights[row, row + 1:] == 0)
    # A fixed random projection of the pooled features: their plain sum is the sum of a LayerNorm's
    # output, whose gradient is zero (only rounding noise reached the weights that way).
    generator = torch.Generator().manual_seed(0)
    pooled = backbone.forward_head(backbone.forward_features(torch.randn(2, 3, 32, 32, generator=generator)),
                                   pre_logits=True)
    (pooled @ torch.randn(pooled.shape[1], generator=generator)).sum().backward()
    grad = backbone.layer_weights.grad
    lower = torch.tril(torch.ones_like(grad, dtype=torch.bool))
    assert torch.all(grad[~lower] == 0)
    assert grad[lower].abs().min() > 1e-4, grad  # every combination weight is learnt, from real signal
    torch.optim.SGD([backbone.layer_weights], lr=1.0).step()
    after = backbone.combination_weights().detach()
    assert torch.all(after[~lower] == 0) and not torch.equal(after, weights)
    assert "layer_weights" in backbone.no_weight_decay()


def test_dlcl_combines_every_earlier_output():
    """Block 3's input depends on block 1's output through the learned weight W[2, 1]."""
    backbone = make("vit_dlcl").eval()
    x = torch.randn(1, 3, 32, 32)
    base = backbone.forward_features(x)
    with torch.no_grad():
        backbone.layer_weights[3, 1] += 1.0
    assert not torch.allclose(backbone.forward_features(x), base)


def test_list_backbones_shows_every_entry(capsys):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    for name in SMALL:
        assert f"  {name} " in out
    assert "every entry also takes: pretrained=None, pretrained_tag=None, compress=" in out


# Small options that train on 16 px digits in seconds.
RUN_OPTIONS = {
    "vit": "{name: vit, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg}",
    "timm_vit": "{name: timm_vit, model: vit_tiny_patch16_224, patch_size: 8, drop_path_rate: 0.0}",
    "vit_dlcl": "{name: vit_dlcl, patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2, global_pool: avg}",
    "swin": "{name: swin, embed_dim: 16, depths: [1, 1], num_heads: [1, 2]}",
    "s3_tiny": "{name: s3_tiny, img_size: 16, drop_path_rate: 0.0}",
    "s3_small": "{name: s3_small, img_size: 16, drop_path_rate: 0.0}",
    "s3_base": "{name: s3_base, img_size: 16, drop_path_rate: 0.0}",
    "resnet18": "{name: resnet18, stem: imagenet}",
    "resnet32": "{name: resnet32, width: 8}",
    "clip": "{name: clip, model: clip-tiny}",
}


def test_every_backbone_has_run_options():
    assert set(RUN_OPTIONS) == set(BACKBONES.names())


# One per family (the S3 entries share swin's builder; resnet32 and vit run elsewhere).
@pytest.mark.parametrize("name", ["timm_vit", "vit_dlcl", "swin", "resnet18"])
def test_backbone_runs_a_digits_protocol_from_yaml(name, tiny_config, tmp_path):
    out = tmp_path / name
    code = main(["run", str(tiny_config), "--out", str(out), "--quiet", "--set", f"backbone={RUN_OPTIONS[name]}",
                 "--set", "training.epochs=1", "--set", "protocol.increment=6",
                 "--set", "training.batch_size=64"])  # few optimizer steps over the large ones' weights
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["backbone"] == name
    assert len(metrics["accuracy_matrix"]) == 2


def test_contract_copy_keeps_a_pruned_or_grown_model_usable():
    """deepcopy (teachers, int8 copies) works for every family's module classes."""
    for name in ("vit_dlcl", "swin", "resnet18"):
        backbone = make(name)
        clone = copy.deepcopy(backbone).eval()
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(clone.forward_features(x), backbone.eval().forward_features(x))


def test_the_dlcl_cost_that_list_states_is_measured_and_the_digits_examples_fit_a_cpu(capsys):
    """`incremental list backbones` warns of vit_dlcl's default cost in figures this test recomputes,
    and every shipped digits config that uses it sets at most 8 blocks."""
    import re
    from pathlib import Path

    import yaml

    from incremental.config import load_config
    from incremental.models.compress import count_macs

    macs = {}
    for name, sets in (("vit", []), ("dlcl", ["backbone={name: vit_dlcl}"]),
                       ("dlcl8", ["backbone={name: vit_dlcl, embed_dim: 128, depth: 8, num_heads: 4}"])):
        cfg = load_config("digits_b0_5steps", sets)[0]
        macs[name] = count_macs(build_backbone(cfg.backbone, in_chans=1, img_size=32), torch.zeros(1, 1, 32, 32))
    assert main(["list", "backbones"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("vit_dlcl "))
    stated = re.search(r"is (\d+) MMACs per 32-px image, (\d+)x the digits ViT \(depth 8, width 128: (\d+)x\)", line)
    assert stated, line
    assert int(stated[1]) == round(macs["dlcl"] / 1e6) and int(stated[2]) == round(macs["dlcl"] / macs["vit"])
    assert int(stated[3]) == round(macs["dlcl8"] / macs["vit"])
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("experiments/**/*.yaml"), *root.glob("protocols/*.yaml")]:
        backbone = (yaml.safe_load(path.read_text()) or {}).get("backbone")
        if isinstance(backbone, dict) and backbone.get("name") == "vit_dlcl":
            assert backbone.get("depth", 24) <= 8, path
