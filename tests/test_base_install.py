"""The base install (no extras: no open_clip, torch-pruning, torchattacks or imagecorruptions)
runs the shipped protocols and the default probe suite, and an extra that is needed is named in
one line. The interpreter sees this environment's real packages less the extras'.

The commands run one after another in one such interpreter, each through the console script's
``main`` with its own standard output and error (an interpreter's imports cost ~10 s; the
entry point itself is .ci/run's and test_config's)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from base_install import base_install

# runs in the base interpreter: each argv through incremental's main, its exit status and output
DRIVER = """
import contextlib, io, json, sys, traceback
from incremental.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            code, _ = 1, traceback.print_exc(file=err)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def base_python(tmp_path_factory) -> Path:
    return base_install(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def base_runs(base_python, tmp_path_factory) -> dict:
    """Every command of this module, in one base interpreter: name -> code, stdout, stderr."""
    folder = tmp_path_factory.mktemp("base_runs")
    run_dir = folder / "run"
    commands = {
        "check": ["check", "digits_b0_5steps_probes"],
        # two experiences, so that the OOD probe after the first has future classes to score
        "run": ["run", "digits_b0_5steps_probes", "--quiet", "--out", str(run_dir), "--set", "training.epochs=1",
                "--set", "protocol.increment=5", "--set", "dataset.image_size=16",
                "--set", "probes=[corruptions, masking, {name: ood, num_samples: 100}]"],
        # plain `incremental probe RUN_DIR`: the default suite, OOD included
        "probe": ["probe", str(run_dir), "--quiet", "--out", str(folder / "probes.json")],
        "clip": ["check", "digits_b0_5steps", "--set", "backbone={name: clip, model: clip-tiny}",
                 "--set", "strategy=zeroshot"],
        "mlflow": ["run", "digits_b0_5steps", "--quiet", "--out", str(folder / "mlflow_run"),
                   "--set", "output.loggers=[mlflow]"],
        "slurm": ["sweep", "digits_b0_5steps", "--out", str(folder / "sweep"), "--launcher", "slurm"],
    }
    done = subprocess.run([str(base_python), "-c", DRIVER, json.dumps(list(commands.values()))], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(zip(commands, json.loads(done.stdout.strip().splitlines()[-1])))
    results["run"]["dir"], results["probe"]["file"] = run_dir, folder / "probes.json"
    return results


@pytest.mark.parametrize("module", ["open_clip", "mlflow", "submitit"])
def test_the_extras_are_really_absent(base_python, module):
    done = subprocess.run([str(base_python), "-c", f"import {module}"], capture_output=True, text=True)
    assert f"No module named '{module}'" in done.stderr


def test_a_tracker_without_its_library_is_one_line_naming_the_extra(base_runs):
    """(W&B is always there: avalanche-lib depends on it.)"""
    logger, index = "mlflow", 0
    done = base_runs[logger]
    assert done["code"] == 2
    assert len(done["stderr"].strip().splitlines()) == 1 and "Traceback" not in done["stderr"], done["stderr"]
    assert f"output.loggers.{index}: logger '{logger}' needs {logger}" in done["stderr"]
    assert f"incremental-vit[{logger}]" in done["stderr"]


def test_the_probes_protocol_and_the_default_probe_suite_run_without_open_clip(base_runs):
    for name in ("check", "run", "probe"):
        assert base_runs[name]["code"] == 0, base_runs[name]["stderr"][-2000:]
    probes = json.loads((base_runs["run"]["dir"] / "metrics.json").read_text())["probes"]
    assert 0 <= probes["ood"][0]["summary"]["auroc/energy"] <= 100, probes["ood"][0]  # scored after experience 0
    assert {"corruptions", "masking"} <= set(probes)
    assert {"corruptions", "masking", "ood"} <= set(json.loads(base_runs["probe"]["file"].read_text())["probes"])


def test_a_clip_backbone_without_open_clip_is_one_line_naming_the_extra(base_runs):
    done = base_runs["clip"]
    assert done["code"] == 2
    assert len(done["stderr"].strip().splitlines()) == 1 and "Traceback" not in done["stderr"], done["stderr"]
    assert "incremental-vit[clip]" in done["stderr"] and "backbone" in done["stderr"]


def test_a_cluster_launcher_without_submitit_is_one_line_naming_the_extra(base_runs):
    done = base_runs["slurm"]
    assert done["code"] == 2
    assert len(done["stderr"].strip().splitlines()) == 1 and "Traceback" not in done["stderr"], done["stderr"]
    assert "--launcher: --launcher slurm submits jobs through submitit" in done["stderr"]
    assert "incremental-vit[slurm]" in done["stderr"]
