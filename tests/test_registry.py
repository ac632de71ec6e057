"""Registries: duplicates and unknown names are errors; every built-in module registers."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

from pathlib import Path

import pytest

import yaml

from incremental.config import RunConfig, load_config, protocol_names
from incremental.errors import ConfigError
from incremental.registry import BUILTIN_MODULES, REGISTRIES, Registry, load_builtins

# Modules that hold shared machinery (or the declarations) rather than components.
NOT_COMPONENTS = {"incremental.data.base", "incremental.models.net", "incremental.models.pretrained",
                  "incremental.models.compress", "incremental.probes.base", "incremental.probes.suite",
                  "incremental.probes.attacks", "incremental.probes.offline", "incremental.data.device",
                  "incremental.data.options", "incremental.models.options", "incremental.probes.options",
                  "incremental.strategies.options", "incremental.models.prompts",
                  "incremental.strategies.pretrained", "incremental.models.peft", "incremental.data.jpeg",
                  "incremental.models.proof", "incremental.models.hub"}
PACKAGES = {"datasets": "incremental.data", "backbones": "incremental.models",
            "strategies": "incremental.strategies", "probes": "incremental.probes"}


def test_duplicate_and_unknown_names():
    registry = Registry("widget")
    registry.register("alpha")(object)
    with pytest.raises(ConfigError, match="widget 'alpha' is already registered"):
        registry.register("alpha")(int)
    with pytest.raises(ConfigError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); known: alpha"):
        registry.get("alpah")


@pytest.mark.parametrize("kind, package", sorted(PACKAGES.items()))
def test_every_component_module_is_declared_and_its_declarations_resolve(kind, package):
    """Each built-in is declared in its package's options module (a dotted target, not
    imported); the target exists, and the declared summary is its docstring's first line."""
    load_builtins()
    modules = {f"{package}.{m.name}" for m in pkgutil.iter_modules(importlib.import_module(package).__path__)}
    builtins = [entry for entry in REGISTRIES[kind] if entry.module.startswith("incremental.")]
    assert modules - NOT_COMPONENTS == {entry.module for entry in builtins}
    assert BUILTIN_MODULES[kind] == (f"{package}.options",)
    for entry in builtins:
        assert isinstance(entry.target, str)
        doc = (entry.obj.__doc__ or "").strip().splitlines()[0]
        assert entry.summary == doc, entry.name


def test_tuning_methods_are_declared_and_resolve_in_peft():
    """The ways of adapting a pre-trained ViT live in one module, declared like the rest."""
    load_builtins()
    assert BUILTIN_MODULES["tuning"] == ("incremental.models.options",)
    entries = list(REGISTRIES["tuning"])
    assert {e.name for e in entries} == {"frozen", "finetune", "adapter", "ssf", "vpt_deep", "lora", "prefix"}
    for entry in entries:
        assert entry.module == "incremental.models.peft" and callable(entry.obj), entry.name
        assert entry.summary == entry.obj.__doc__.strip().splitlines()[0]


def test_listing_and_validating_import_neither_torch_nor_avalanche():
    """What makes `incremental list`, `check --no-data` and a config typo answer in well under
    2 s: the declarations, the schema and the parser need none of the heavy libraries."""
    code = ("import sys; from incremental.cli import main; "
            "assert main(['list']) == 0; assert main(['check', 'cifar100_b50_10steps', '--no-data']) == 0; "
            "assert main(['check', 'digits_b0_5steps', '--no-data', '--set', 'training.epoch=3']) == 2; "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'avalanche', 'timm', 'torchvision'}); "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_builtin_names():
    load_builtins()
    assert {"digits", "synthetic", "cifar100", "imagefolder"} <= set(REGISTRIES["datasets"].names())
    assert {"vit", "timm_vit", "vit_dlcl", "swin", "s3_tiny", "s3_small", "s3_base", "resnet18", "resnet32", "clip"} == \
        set(REGISTRIES["backbones"].names())
    assert {"finetune", "replay", "vitil", "icarl", "lwf", "ewc", "bic", "der", "gdumb", "zeroshot", "continual_clip",
            "clip_replay", "proof"} <= \
        set(REGISTRIES["strategies"].names())
    assert {"corruptions", "masking", "fourier", "adversarial", "dct_spectrum", "ood"} == \
        set(REGISTRIES["probes"].names())


@pytest.mark.parametrize("name", protocol_names())
def test_every_shipped_protocol_validates(name):
    cfg, _ = load_config(name)
    assert cfg.name == name and cfg.description


EXPERIMENT_CONFIGS = sorted((Path(__file__).parents[1] / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_config_validates(path):
    from incremental.config.schema import PretrainConfig

    schema = PretrainConfig if "mae" in (yaml.safe_load(path.read_text()) or {}) else RunConfig
    cfg, _ = load_config(str(path), schema=schema)
    assert cfg.name


def test_experiment_configs_are_found():
    assert len(EXPERIMENT_CONFIGS) >= 38  # 7 full-size ViTIL, 2 x 8 ablation, 11 backbone, 4 probe configs


def test_strategies_are_installed_under_the_incremental_root():
    import incremental.protocols
    import incremental.strategies.replay as replay

    assert replay.__name__ == "incremental.strategies.replay"
    assert "digits_b0_5steps" in protocol_names() and incremental.protocols.__doc__
