"""The GPU benchmarks' CPU smoke mode: the scripts run end to end on the real toolkit and print
their tables (their figures are not checked; speed targets live in the scripts, not in tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import script_in_fork

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"


def run_script(name: str, tmp_path: Path) -> str:
    """The script's --tiny mode in a forked copy of this process (one thread), as
    ``python SCRIPT --tiny`` runs it; its standard output."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    assert script_in_fork(BENCH / name, "--tiny", stdout=out, stderr=err) == 0, err.read_text()[-3000:]
    return out.read_text()


def test_bench_gpu_tiny_prints_both_contenders_and_their_ratio(tmp_path):
    out = run_script("bench_gpu.py", tmp_path)
    row = re.search(r"^\s+16 fp32\s+(\d+)\s+(\d+)\s+([\d.]+)", out, re.M)
    assert row, out
    loop, toolkit, ratio = float(row[1]), float(row[2]), float(row[3])
    assert loop > 0 and toolkit > 0 and ratio == pytest.approx(toolkit / loop, abs=0.01)


def test_bench_protocol_tiny_breaks_the_run_into_phases(tmp_path):
    out = run_script("bench_protocol.py", tmp_path)
    phases = dict(re.findall(r"^(\w+)\s+([\d.-]+)\s+[\d.-]+%$", out, re.M))
    assert set(phases) == {"sgd", "kd_teacher", "balanced_finetuning", "exemplar_selection", "compile",
                           "evaluation", "probes", "other"}, out
    # ViTIL's own phases were timed (a KD teacher from step 1, balanced finetuning, herding)
    assert all(float(phases[p]) > 0 for p in ("sgd", "kd_teacher", "balanced_finetuning", "exemplar_selection"))
    assert re.search(r"ratio [\d.]+ \(training\)", out), out


def test_bench_jpeg_tiny_measures_both_data_paths(tmp_path):
    out = run_script("bench_jpeg.py", tmp_path)
    rows = dict((path, (float(data), float(train)))
                for path, data, train in re.findall(r"^(loader|device)\s+(\d+)\s+(\d+)$", out, re.M))
    assert set(rows) == {"loader", "device"} and all(v > 0 for pair in rows.values() for v in pair), out
