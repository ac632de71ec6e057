"""What a researcher reads, through the real CLI: one numbering of experiences (from 0), a
progress bar for every long phase and silence under --quiet, list columns that keep their gap,
and files that all get the same permissions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import TINY_RUN, rewind_checkpoint

from incremental.cli import main

PLUGIN = Path(__file__).resolve().parent.parent / "experiments" / "custom_plugin" / "weight_aligning.py"
FAST = ["--set", "training.epochs=1", "--set", "output.tensorboard=false"]


def test_experiences_are_numbered_from_0_in_every_line(tmp_path, capsys):
    """The progress lines, the resume line and the table agree: a run resumed after experience 0
    says `at exp 1` and continues with `exp 1 of 0-2`, as its table's rows 1 and 2."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), *FAST]) == 0
    first = capsys.readouterr().out
    assert "3 experiences (exp 0-2)" in first
    assert [line.split("  ")[0] for line in first.splitlines() if line.startswith("exp ") and " of " in line] == \
        ["exp 0 of 0-2", "exp 1 of 0-2", "exp 2 of 0-2"]
    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped)
    rewind_checkpoint(stopped, 0)
    assert main(["run", "--resume", str(stopped)]) == 0
    resumed = capsys.readouterr().out
    assert f"resuming {stopped} at exp 1" in resumed
    assert [line.split("  ")[0] for line in resumed.splitlines() if line.startswith("exp ") and " of " in line] == \
        ["exp 1 of 0-2", "exp 2 of 0-2"]
    rows = [line.split() for line in resumed.splitlines() if line[:3].strip().isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    # the time column is the step's wall time; the phases inside train and eval are not added again
    wall = json.loads((stopped / "metrics.json").read_text())["wall_time_s"]
    assert "eval_earlier" in wall[1]
    assert [float(row[-1]) for row in rows] == \
        [round(s["train"] + s["eval"] + s["probes"] + s.get("compile", 0.0), 1) for s in wall]


def test_every_long_phase_shows_a_bar_and_quiet_silences_them_all(tmp_path, capfd):
    """ViTIL's balanced finetuning and each probe draw a bar (stderr); --quiet prints nothing."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    sets = [*FAST, "--set", "strategy={name: vitil, balanced_finetuning: {epochs: 2}}", "--set",
            "probes=[{name: masking, num_samples: 20}]", "--set", "protocol.increment=6"]
    capfd.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "loud"), *sets]) == 0
    loud = capfd.readouterr()
    for bar in ("exp 0 train", "exp 1 balanced finetuning", "exp 0 probe masking"):
        assert bar in loud.err, bar
    assert "probe masking: " in loud.out
    assert main(["run", str(config), "--out", str(tmp_path / "quiet"), "--quiet", *sets]) == 0
    quiet = capfd.readouterr()
    assert quiet.out == "" and quiet.err == ""


def test_list_columns_keep_their_gap_for_long_names(capsys):
    """A 15-character plugin name (the README's weight_aligning) and continual_clip are followed
    by two spaces before their summary, as every other entry."""
    assert main(["list", "strategies", "--plugin", str(PLUGIN)]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = [line for line in lines if line.startswith("  ") and not line.strip().startswith("options:")
               and not line.startswith("  (")]
    summary_column = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in entries}
    assert len(summary_column) == 1, entries  # every summary starts in the same column
    assert any(line.startswith("  weight_aligning  ") for line in entries)
    assert any(line.startswith("  continual_clip  ") for line in entries)


def test_every_file_a_run_writes_has_the_same_mode(tmp_path):
    """Weights, checkpoints, metrics, probe results and a comparison: all get the mode a plain
    file gets under the process's umask (0644 under the usual 022)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run_dir), "--quiet", *FAST[:2], "--set", "output.checkpoint=all",
                 "--set", "protocol.increment=6"]) == 0
    assert main(["probe", str(run_dir), "--quiet", "--set", "probes=[{name: fourier, num_samples: 8}]"]) == 0
    assert main(["compare", str(run_dir), "--out", str(tmp_path / "comparison")]) == 0
    reference = tmp_path / "plain.txt"
    reference.write_text("a file opened the usual way")
    expected = reference.stat().st_mode & 0o777
    files = [p for folder in (run_dir, tmp_path / "comparison") for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "checkpoint.pt", "experience_000.pt", "metrics.json", "config.yaml", "probes.json",
            "report.md"} <= names
    assert any(name.endswith(".png") for name in names) and any(name.startswith("events.out") for name in names)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes
    assert json.loads((run_dir / "probes.json").read_text())["experience"] == 1


def test_the_closed_form_feature_and_memory_phases_and_the_probes_show_bars_with_totals(tmp_path, capfd):
    """RanPAC's ridge solves (17 candidate lambdas and the final solve), the feature pass, a byte
    memory's encoding (old and new classes) and each probe open a bar that knows its total (a
    fast phase's bar is cleared before tqdm redraws it, so the opening line is what is checked)."""
    import re

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    capfd.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "ranpac"), *FAST, "--set", "protocol.increment=6",
                 "--set", "strategy={name: ranpac, tuning: frozen, projection_dim: 200}",
                 "--set", "probes=[{name: masking, num_samples: 20, batch_size: 8}]"]) == 0
    err = capfd.readouterr().err
    assert re.search(r"RanPAC ridge \(200 x 200, fp64\):\s+0%\|[^|]*\| 0/18 ", err), err[-2000:]
    assert re.search(r"feature pass:\s+0%\|[^|]*\| 0/\d+ ", err)
    # masking: the clean pass and 4 fractions, with and without patch drop: 9 passes of 3 batches
    assert re.search(r"exp 0 probe masking:\s+0%\|[^|]*\| 0/27 ", err), err[-2000:]
    assert main(["run", str(config), "--out", str(tmp_path / "jpeg"), *FAST, "--set", "protocol.increment=6",
                 "--set", "protocol.memory={bytes: 20000, codec: jpeg}"]) == 0
    err = capfd.readouterr().err
    assert re.search(r"memory encoding:\s+0%\|[^|]*\| 0/4 ", err) and re.search(r"memory encoding:\s+0%\|[^|]*\| 0/10 ", err)
