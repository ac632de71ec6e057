"""Users' plugins: files and modules named in the YAML or by --plugin, installed packages'
entry points, the shipped examples run from outside the repository, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import main_in_fork

from incremental.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "experiments" / "custom_plugin"

MY_STRATEGY = '''
from dataclasses import dataclass

from incremental.config import opt
from incremental.registry import STRATEGIES
from incremental.strategy import StrategyPlugin


@dataclass
class FrozenHeadConfig:
    after: int = opt(1, ge=0)  # freeze the old classifier rows from this experience on


@STRATEGIES.register("my_frozen_head", config=FrozenHeadConfig)
class FrozenHead(StrategyPlugin):
    """Finetuning that zeroes the gradient of old classes' classifier rows."""

    def before_update(self, strategy, **kwargs):
        step = strategy.experience.current_experience
        if step >= self.config.after:
            start = self.context.class_split.label_ranges()[step].start
            strategy.model.head.classifier.weight.grad[:start] = 0
'''


def test_a_strategy_file_outside_the_repository_runs_by_name(tmp_path, tiny_config, capsys):
    plugin = tmp_path / "elsewhere" / "my_strategy.py"
    plugin.parent.mkdir()
    plugin.write_text(MY_STRATEGY)
    config = tmp_path / "elsewhere" / "run.yaml"  # the plugin path is relative to this file
    config.write_text(f"extends: {tiny_config}\nplugins: [my_strategy.py]\nstrategy: {{name: my_frozen_head, after: 1}}\n"
                      "training: {epochs: 1}\n")
    assert main(["list", "strategies", "--plugin", str(plugin)]) == 0
    assert "my_frozen_head" in capsys.readouterr().out
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "mine")]) == 0
    metrics = json.loads((tmp_path / "mine" / "metrics.json").read_text())
    assert metrics["strategy"] == "my_frozen_head" and metrics["status"] == "complete"
    recorded = (tmp_path / "mine" / "config.yaml").read_text()
    assert str(plugin.resolve()) in recorded  # config.yaml re-imports it from anywhere
    assert main(["run", str(tiny_config), "--quiet", "--out", str(tmp_path / "builtin"), "--set", "training.epochs=1",
                 "--set", "strategy=finetune"]) == 0
    assert main(["compare", str(tmp_path / "mine"), str(tmp_path / "builtin"), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "strategy.name=my_frozen_head" in table and "strategy.name=finetune" in table
    # The plugin's own typed config is checked like a built-in's.
    assert main(["check", str(config), "--no-data", "--set", "strategy.after=-1"]) == 2
    assert "strategy.after: must be >= 0, got -1" in capsys.readouterr().err


def test_shipped_examples_run_from_outside_the_package(tmp_path):
    """Each example by its file path, from a folder outside the repository (a forked copy of
    this process that changes into it: no fresh interpreter's imports)."""
    common = ["run", "digits_b0_5steps", "--set", "training.epochs=1", "--set", "protocol.increment=5",
              "--set", "output.tensorboard=false",
              "--set", "dataset.image_size=16"]  # the smallest digits: the test is about loading the examples
    for name, overrides in (("weight_aligning", ["--set", "strategy=weight_aligning"]),
                            ("small_cnn", ["--set", "backbone=small_cnn", "--set", "training.optimizer.lr=0.01"])):
        errors = tmp_path / f"{name}.err"
        code = main_in_fork(*common, "--plugin", str(EXAMPLES / f"{name}.py"), *overrides, "--out", name,
                            cwd=tmp_path, stderr=errors)
        assert code == 0, errors.read_text()[-2000:]
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["status"] == "complete"
    ratio = json.loads((tmp_path / "weight_aligning" / "metrics.json").read_text())["head_norm_ratio"][1]
    assert abs(ratio - 1.0) < 1e-4  # weight aligning equalised the new and old classifier norms


def test_an_installed_package_entry_point_is_listed(tmp_path):
    package = tmp_path / "src"
    (package / "tiny_plugin_pkg").mkdir(parents=True)
    (package / "tiny_plugin_pkg" / "__init__.py").write_text("")
    (package / "tiny_plugin_pkg" / "backbone.py").write_text(textwrap.dedent('''
        from torch import nn
        from incremental.registry import BACKBONES

        @BACKBONES.register("tiny_pkg_mlp")
        def build(cfg, *, in_chans, img_size):
            """An MLP backbone from an installed package."""
            return nn.Flatten()
    '''))
    (package / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    (package / "setup.cfg").write_text(textwrap.dedent('''
        [metadata]
        name = tiny-plugin-pkg
        version = 0.1
        [options]
        packages = tiny_plugin_pkg
        [options.entry_points]
        incremental.plugins =
            tiny = tiny_plugin_pkg.backbone
    '''))
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(package)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    listed = subprocess.run([sys.executable, "-m", "incremental", "list", "backbones"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "tiny_pkg_mlp" in listed.stdout and "An MLP backbone from an installed package." in listed.stdout


def test_plugin_errors_are_one_line(tmp_path, tiny_config, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\n\nraise RuntimeError('half-written plugin')\n")
    clash = tmp_path / "clash.py"
    clash.write_text("from incremental.registry import STRATEGIES\n\n@STRATEGIES.register('replay')\nclass Mine:\n    pass\n")
    config = tmp_path / "with_plugins.yaml"
    config.write_text(f"extends: {tiny_config}\nplugins: [missing.py]\n")
    cases = [
        (["check", str(tiny_config), "--no-data", "--plugin", str(tmp_path / "nope.py")], "--plugin: plugin file",
         "does not exist"),
        (["check", str(config), "--no-data"], f"{config}: plugins.0: plugin file", "missing.py does not exist"),
        (["check", str(tiny_config), "--no-data", "--plugin", str(broken)], "--plugin: ",
         "failed to import: RuntimeError: half-written plugin (at broken.py:3)"),
        (["check", str(tiny_config), "--no-data", "--plugin", str(clash)], "--plugin: ",
         "strategy 'replay' is already registered"),
        (["list", "--plugin", "no_such_module_here"], "--plugin: ", "no module named 'no_such_module_here'"),
    ]
    for args, where, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(where) and message in err, err
