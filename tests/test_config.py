"""Strict config loading: one-line errors naming the file and the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from incremental.cli import main
from incremental.config import ProtocolConfig, RunConfig, dump_yaml, load_config, parse_dataclass
from incremental.errors import ConfigError


def error_of(path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(str(path), list(overrides))
    return str(info.value)


@pytest.mark.parametrize("body, expected", [
    ("trainig: {epochs: 2}", "trainig: unknown key (did you mean 'training'?)"),
    ("training: {epoch: 2}", "training.epoch: unknown key (did you mean 'epochs'?)"),
    ("training: {optimizer: {lr: fast}}", "training.optimizer.lr: expected a number, got 'fast'"),
    ("training: {epochs: 2.5}", "training.epochs: expected an integer, got 2.5"),
    ("training: {epochs: 0}", "training.epochs: must be >= 1, got 0"),
    ("training: {batch_size: true}", "training.batch_size: expected an integer, got True"),
    ("training: {optimizer: {name: adamm}}", "training.optimizer.name: expected one of 'sgd', 'adam', 'adamw', "
                                             "got 'adamm' (did you mean 'adam' or 'adamw'?)"),
    ("backbone: {name: vitt}", "backbone.name: unknown backbone 'vitt' (did you mean 'vit'?)"),
    ("backbone: {name: vit, depht: 2}", "backbone.depht: unknown key (did you mean 'depth'?)"),
    ("backbone: {name: vit, embed_dim: 30, num_heads: 4}", "backbone.num_heads: embed_dim 30 is not divisible"),
    ("strategy: replai", "strategy.name: unknown strategy 'replai' (did you mean 'replay' or 'gan_replay'?)"),
    ("strategy: {name: replay, selection: herd}", "strategy.selection: expected one of 'herding', 'random'"),
    ("dataset: {name: digits, image_size: 4}", "dataset.image_size: must be >= 8, got 4"),
    ("protocol: {increment: [2, 0, 3]}", "protocol.increment.1: must be >= 1, got 0"),
    ("protocol: {increment: -2}", "protocol.increment: must be >= 1, got -2"),
    ("protocol: {memory: {total: 10, per_class: 2}}", "protocol.memory.per_class: set one of total, per_class and bytes"),
    ("protocol: {class_order: [1, two]}", "protocol.class_order.1: expected an integer, got 'two'"),
    ("probes: [{name: corruption}]", "probes.0.name: unknown probe 'corruption' (did you mean 'corruptions'?)"),
    ("- a\n- b", "expected a mapping at the top level"),
    ("training: {epochs: 2\n", "invalid YAML"),
])
def test_bad_config_names_file_and_key(write_yaml, body, expected):
    path = write_yaml(body)
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_yaml_syntax_error_gives_the_line(write_yaml):
    path = write_yaml("seed: 1\ntraining:\n  epochs: [1, 2\n")
    assert f"{path}: line " in error_of(path)


def test_numbers_written_without_a_dot_are_accepted(write_yaml):
    cfg, _ = load_config(str(write_yaml("training: {optimizer: {lr: 1e-3}}")))
    assert cfg.training.optimizer.lr == pytest.approx(1e-3)


def test_overrides_apply_and_errors_name_the_flag(write_yaml):
    path = write_yaml("training: {epochs: 3}")
    cfg, _ = load_config(str(path), ["training.epochs=5", "backbone.depth=2", "protocol.increment=[4,3,3]"])
    assert (cfg.training.epochs, cfg.backbone.config.depth, cfg.protocol.increment) == (5, 2, [4, 3, 3])
    message = error_of(path, "training.epoch=5")
    assert message.startswith("--set training.epoch=5: training.epoch: unknown key (did you mean 'epochs'?)")
    assert "expected key.path=value" in error_of(path, "training.epochs")


def test_override_to_a_shorthand_component(write_yaml):
    cfg, _ = load_config(str(write_yaml("strategy: replay")), ["strategy.selection=random"])
    assert cfg.strategy.name == "replay" and cfg.strategy.config.selection == "random"


def test_extends_merges_and_attributes_errors_to_the_right_file(write_yaml, tmp_path):
    write_yaml("training: {epochs: 0}\nbackbone: {name: vit, depth: 2}\n", "base.yaml")
    child = write_yaml("extends: base.yaml\nseed: 7\n", "child.yaml")
    message = error_of(child)
    assert message.startswith(f"{tmp_path / 'base.yaml'}: training.epochs: must be >= 1")
    fixed = write_yaml("extends: base.yaml\ntraining: {epochs: 4}\nbackbone: {name: resnet32}\n", "fixed.yaml")
    cfg, _ = load_config(str(fixed))
    # the child's epochs win; a component whose name changes is replaced, not merged
    assert cfg.training.epochs == 4 and cfg.backbone.name == "resnet32" and cfg.backbone.config.width == 16


def test_extends_a_shipped_protocol_and_cycles(write_yaml):
    cfg, _ = load_config(str(write_yaml("extends: digits_b0_5steps\nstrategy: finetune\n")))
    assert cfg.protocol.increment == 2 and cfg.strategy.name == "finetune"
    write_yaml("extends: b.yaml", "a.yaml")
    b = write_yaml("extends: a.yaml", "b.yaml")
    assert "cycle" in error_of(b)


def test_unknown_protocol_name_suggests_close_ones():
    with pytest.raises(ConfigError, match="did you mean 'digits_b0_5steps'"):
        load_config("digits_b0_5step")
    with pytest.raises(ConfigError, match="no such file: missing/x.yaml"):
        load_config("missing/x.yaml")


def test_resolved_config_round_trips(write_yaml):
    cfg, _ = load_config("digits_b0_5steps", ["training.epochs=3"])
    again, _ = load_config(str(write_yaml(dump_yaml(cfg), "resolved.yaml")))
    assert again == cfg


def test_defaults_fill_every_section():
    cfg = parse_dataclass(RunConfig, {})
    assert (cfg.dataset.name, cfg.backbone.name, cfg.strategy.name) == ("digits", "vit", "finetune")
    assert parse_dataclass(ProtocolConfig, {"increment": [1, 2]}).increment == [1, 2]


def test_cli_prints_one_line_and_exits_2(write_yaml, capsys):
    path = write_yaml("training: {epoch: 1}")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{path}: training.epoch: unknown key (did you mean 'epochs'?)"


def test_console_script_error_has_no_traceback(write_yaml):
    """The entry point in a fresh interpreter: a config error is one line, exit 2. (A typo is
    found before the heavy imports; the error raised after them goes through the same ``main``
    and is checked in the process below.)"""
    path = write_yaml("training: {epoch: 3}")
    proc = subprocess.run([sys.executable, "-m", "incremental", "run", str(path), "--quiet",
                           "--out", str(path.parent / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"{path}: training.epoch") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_an_error_found_while_building_the_run_is_one_line(write_yaml, capsys):
    path = write_yaml("backbone: {name: vit, patch_size: 5}\ndataset: {name: digits, image_size: 16}")
    assert main(["run", str(path), "--quiet", "--out", str(path.parent / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"{path}: backbone.patch_size: image size 16 is not divisible by patch_size 5"
    assert "Traceback" not in captured.err and captured.out == ""


def test_check_prints_the_resolved_config(capsys):
    assert main(["check", "digits_b0_5steps", "--set", "training.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "5 experiences of [2, 2, 2, 2, 2] classes" in out
    assert yaml.safe_load(out)["training"]["epochs"] == 3
