"""The base install (no extras: no open_clip, torch-pruning, torchattacks or imagecorruptions)
runs the shipped protocols and the default probe suite, and an extra that is needed is named in
one line. The interpreter sees this environment's real packages less the extras'."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from base_install import base_install


@pytest.fixture(scope="module")
def base_python(tmp_path_factory) -> Path:
    return base_install(tmp_path_factory.mktemp("base"))


def incremental_base(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "incremental", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_extras_are_really_absent(base_python):
    done = subprocess.run([str(base_python), "-c", "import open_clip"], capture_output=True, text=True)
    assert "No module named 'open_clip'" in done.stderr


def test_the_probes_protocol_and_the_default_probe_suite_run_without_open_clip(base_python, tmp_path):
    run_dir = tmp_path / "run"
    checked = incremental_base(base_python, "check", "digits_b0_5steps_probes")
    assert checked.returncode == 0, checked.stderr[-2000:]
    # two experiences, so that the OOD probe after the first has future classes to score
    done = incremental_base(base_python, "run", "digits_b0_5steps_probes", "--quiet", "--out", str(run_dir),
                            "--set", "training.epochs=1", "--set", "protocol.increment=5", "--set", "dataset.image_size=16",
                            "--set", "probes=[corruptions, masking, {name: ood, num_samples: 100}]")
    assert done.returncode == 0, done.stderr[-2000:]
    probes = json.loads((run_dir / "metrics.json").read_text())["probes"]
    assert 0 <= probes["ood"][0]["summary"]["auroc/energy"] <= 100, probes["ood"][0]  # scored after experience 0
    assert {"corruptions", "masking"} <= set(probes)
    # plain `incremental probe RUN_DIR`: the default suite, OOD included
    offline = incremental_base(base_python, "probe", str(run_dir), "--quiet", "--out", str(tmp_path / "probes.json"))
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert {"corruptions", "masking", "ood"} <= set(json.loads((tmp_path / "probes.json").read_text())["probes"])


def test_a_clip_backbone_without_open_clip_is_one_line_naming_the_extra(base_python, tmp_path):
    done = incremental_base(base_python, "check", "digits_b0_5steps", "--set", "backbone={name: clip, model: clip-tiny}",
                            "--set", "strategy=zeroshot")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "incremental-vit[clip]" in done.stderr and "backbone" in done.stderr
