"""Baselines run by name through the one runner, on Avalanche's own plugins where they exist."""

from __future__ import annotations

import pytest

from incremental.config import load_config
from incremental.data import build_dataset
from incremental.errors import ConfigError
from incremental.protocol import build_benchmark, make_class_split
from incremental.run import run

BASELINES = {
    "lwf": [],
    "ewc": ["strategy.ewc_lambda=100.0"],
    "bic": ["strategy.stage_2_epochs=2"],
    "der": [],
    "gdumb": [],
    "icarl": [],
}


def _train_sizes(cfg) -> list[int]:
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    benchmark = build_benchmark(splits, make_class_split(cfg.protocol, splits.num_classes, cfg.seed))
    return [len(exp.dataset) for exp in benchmark.train_stream]


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_runs_by_name(name, tiny_config, tmp_path):
    cfg, _ = load_config(str(tiny_config), [f"strategy={name}", "training.epochs=1", *BASELINES[name]])
    metrics = run(cfg, tmp_path / name, quiet=True)
    assert metrics["status"] == "complete" and metrics["strategy"] == name
    assert all(0 <= a <= 100 for row in metrics["accuracy_matrix"] for a in row)
    new_data = _train_sizes(cfg)
    if name == "gdumb":  # trains on its class-balanced memory only
        assert metrics["train_samples"] == [30, 30, 30]
    if name in ("lwf", "ewc", "der"):  # no memory in the dataset (DER replays it as separate batches)
        assert metrics["train_samples"] == new_data
    if name == "icarl":  # herding memory concatenated from the second experience
        assert metrics["train_samples"][0] == new_data[0] and metrics["train_samples"][1] == new_data[1] + 30
    if name == "bic":  # BiC holds out part of each class for its bias layer
        assert metrics["train_samples"][0] < new_data[0]


def test_icarl_classifies_by_nearest_mean_unless_told_otherwise(tiny_config, tmp_path):
    ncm, _ = load_config(str(tiny_config), ["strategy=icarl", "training.epochs=1"])
    cnn, _ = load_config(str(tiny_config), ["strategy={name: icarl, classifier: cnn}", "training.epochs=1"])
    a = run(ncm, tmp_path / "ncm", quiet=True)
    b = run(cnn, tmp_path / "cnn", quiet=True)
    assert a["train_loss"] == b["train_loss"]  # the same training ...
    assert a["accuracy_matrix"] != b["accuracy_matrix"]  # ... judged by another classifier


def test_baseline_options_are_checked(tiny_config):
    with pytest.raises(ConfigError) as info:
        load_config(str(tiny_config), ["strategy={name: ewc, mode: online}"])
    assert info.value.key == "strategy.decay_factor"
    with pytest.raises(ConfigError) as info:
        load_config(str(tiny_config), ["strategy={name: der, alpah: 0.3}"])
    assert info.value.key == "strategy.alpah" and "alpha" in str(info.value)


@pytest.mark.parametrize("name", ["gdumb", "bic", "der", "icarl"])
def test_memory_based_baselines_need_a_memory(name, tiny_config, tmp_path):
    cfg, _ = load_config(str(tiny_config), [f"strategy={name}", "protocol.memory={total: 0}"])
    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path / name, quiet=True)
    assert info.value.key == "protocol.memory"
