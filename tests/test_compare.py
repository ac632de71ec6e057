"""`incremental compare`: groups over seeds, the table's numbers against metrics.json, and
the plots (files and number of series)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import rewind_checkpoint

from incremental.cli import main
from incremental.compare import compare, curves_figure, group_runs, load_run, plot_curves
from incremental.config import dump_yaml, load_config
from incremental.metrics import summarize


def write_run(root: Path, name: str, seed: int, strategy: str, matrix: list[list[float]],
              probes: dict | None = None) -> Path:
    """A run directory as `incremental run` writes it: the resolved config and metrics.json."""
    cfg, _ = load_config("digits_b0_5steps", [f"seed={seed}", f"protocol.order_seed={seed}", f"strategy={strategy}"])
    path = root / name
    path.mkdir()
    (path / "config.yaml").write_text(dump_yaml(cfg))
    metrics = {"name": "digits_b0_5steps", "seed": seed, "status": "complete",
               **summarize(matrix, [90] * len(matrix)), "probes": probes or {}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


MATRICES = {
    ("replay", 0): [[100.0], [90.0, 98.0], [85.0, 90.0, 96.0]],
    ("replay", 1): [[98.0], [94.0, 96.0], [80.0, 92.0, 94.0]],
    ("finetune", 0): [[100.0], [10.0, 99.0], [0.0, 5.0, 99.0]],
    ("finetune", 1): [[99.0], [20.0, 97.0], [5.0, 0.0, 98.0]],
}


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    probes = {"corruptions": [{"summary": {"mean_accuracy": 70.0}}, None, {"summary": {"mean_accuracy": 60.0}}]}
    return [write_run(tmp_path, f"{strategy}-{seed}", seed, strategy, matrix, probes if strategy == "replay" else None)
            for (strategy, seed), matrix in MATRICES.items()]


def test_runs_differing_only_in_seed_form_one_group(runs):
    groups = group_runs([load_run(p) for p in runs])
    assert [g.label for g in groups] == ["strategy.name=replay", "strategy.name=finetune"]
    assert [len(g.runs) for g in groups] == [2, 2]
    by_seed = group_runs([load_run(p) for p in runs], ["seed"])
    assert [g.label for g in by_seed] == ["seed=0", "seed=1"]


def test_table_numbers_come_from_metrics_json(runs, tmp_path, capsys):
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    for strategy in ("replay", "finetune"):
        metrics = [json.loads((p / "metrics.json").read_text()) for p in runs if p.name.startswith(strategy)]
        row = next(line for line in printed.splitlines() if line.startswith(f"strategy.name={strategy}"))
        for value in (statistics.mean(m["average_incremental_accuracy"] for m in metrics),
                      statistics.stdev(m["average_incremental_accuracy"] for m in metrics),
                      statistics.mean(m["forgetting"]["mean"] for m in metrics),
                      statistics.mean(m["bwt"]["final"] for m in metrics)):
            assert f"{value:.2f}" in row, (value, row)
    replay_row = next(line for line in printed.splitlines() if line.startswith("strategy.name=replay"))
    assert "60.00" in replay_row  # the corruption probe at its last probed step
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| strategy.name=replay | 2 |" in report


def test_plots_have_one_series_per_group(runs, tmp_path):
    out = tmp_path / "cmp"
    compare(runs, out)
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "accuracy.png", "forgetting.png", "accuracy_matrix_0.png", "accuracy_matrix_1.png",
            "probe_corruptions_mean_accuracy.png"} <= files
    assert "probe_ood_auroc_max_logit.png" not in files  # no run has that probe
    groups = group_runs([load_run(p) for p in runs])
    assert plot_curves(groups, lambda m: m["accuracy"], "accuracy", tmp_path / "a.png") == 2
    assert plot_curves(groups, lambda m: (m.get("probes") or {}).get("corruptions") and
                       [r and r["summary"]["mean_accuracy"] for r in m["probes"]["corruptions"]],
                       "probe", tmp_path / "b.png") == 1


def test_curves_have_integer_experience_ticks_and_bands_inside_0_100(runs):
    """A forgetting of 5 ± 5.7 is drawn from 0, not -0.7; an accuracy of 95 ± 7.1 up to 100, not
    102; the x ticks are 0, 1, 2, never 0.5."""
    groups = group_runs([load_run(p) for p in runs])
    series = {0: [0.0, 1.0, 100.0], 1: [0.0, 9.0, 90.0]}  # per seed: a low and a high mean ± std
    fig, drawn = curves_figure(groups, lambda m: series[m["seed"]], "bounded")
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert drawn == 2 and ticks == [0.0, 1.0, 2.0]
    heights = [y for band in ax.collections for path in band.get_paths() for y in path.vertices[:, 1]]
    assert min(heights) == 0.0 and max(heights) == 100.0
    assert statistics.mean([1.0, 9.0]) - statistics.stdev([1.0, 9.0]) < 0  # unclipped, it would dip below 0
    assert statistics.mean([100.0, 90.0]) + statistics.stdev([100.0, 90.0]) > 100


def test_a_sweep_folder_compares_and_its_comparison_folder_is_skipped(runs, tmp_path, capsys):
    """`sweep` writes OUT/comparison inside its folder; `compare OUT/*` and `compare OUT` skip it."""
    sweep = runs[0].parent
    (sweep / "comparison").mkdir()
    (sweep / "comparison" / "report.md").write_text("# Comparison\n")
    for args in ([str(p) for p in sorted(sweep.iterdir())], [str(sweep)]):
        assert main(["compare", *args, "--out", str(tmp_path / "cmp")]) == 0
        printed = capsys.readouterr().out
        assert "strategy.name=replay       2" in printed and "strategy.name=finetune     2" in printed
        assert f"(skipped {sweep / 'comparison'}: not a run directory (no config.yaml))" in printed
    assert main(["compare", str(sweep / "comparison")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"RUN_DIR: {sweep / 'comparison'} holds no run directory (no config.yaml); name runs or a " \
                  "sweep's folder"


def test_incomplete_runs_are_left_out(runs, tmp_path, capsys):
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    (runs[0] / "metrics.json").write_text(json.dumps({**metrics, "status": "failed"}))
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "strategy.name=replay       1" in printed and "left out 1 run that is not complete" in printed
    assert main(["compare", str(runs[0])]) == 2
    assert "none of the 1 run is complete" in capsys.readouterr().err


def test_compare_errors_are_one_line(runs, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "RUN_DIR: " in capsys.readouterr().err
    (runs[0] / "metrics.json").write_text("{not json")
    assert main(["compare", str(runs[0])]) == 2
    assert "unreadable run files" in capsys.readouterr().err
    assert main(["compare", str(runs[1]), "--group-by", "strategy.nmae"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("--group-by: ") and "did you mean 'strategy.name'" in err and len(err.splitlines()) == 1


def test_a_real_run_compares(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "real"
    assert main(["run", str(tiny_config), "--quiet", "--out", str(run_dir), "--set", "training.epochs=1"]) == 0
    assert main(["compare", str(run_dir), "--out", str(tmp_path / "cmp")]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{metrics['last_accuracy']:.2f}" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 3


# ----------------------------------------------------------------------------- sweep


def test_sweep_values_split_on_top_level_commas():
    from incremental.sweep import grid, split_values

    assert split_values("replay,finetune") == ["replay", "finetune"]
    assert split_values("[1, 2],{a: 1, b: 2}") == ["[1, 2]", "{a: 1, b: 2}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    fixed, axes = grid(["training.epochs=1", "strategy=replay,finetune", "training.optimizer.lr=0.1,0.01"])
    assert fixed == ["training.epochs=1"]
    assert axes == [("strategy", ["replay", "finetune"]), ("training.optimizer.lr", ["0.1", "0.01"])]


def test_sweep_runs_the_grid_keeps_complete_runs_and_compares(tiny_config, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "sweep"
    args = ["sweep", str(tiny_config), "--seeds", "0", "1", "--set", "strategy=replay,finetune",
            "--set", "training.epochs=1", "--out", str(out)]
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir() if p.name != "comparison")
    assert names == ["strategy=finetune-seed0", "strategy=finetune-seed1", "strategy=replay-seed0",
                     "strategy=replay-seed1"]
    printed = capsys.readouterr().out
    assert "strategy.name=replay       2" in printed and (out / "comparison" / "report.md").is_file()
    seeds = {json.loads((out / n / "metrics.json").read_text())["seed"] for n in names}
    assert seeds == {0, 1}

    # Again: complete runs are kept, a stopped one is resumed from its checkpoint, and one with
    # no checkpoint is run again.
    stamps = {n: (out / n / "metrics.json").stat().st_mtime_ns for n in names}
    stopped = out / "strategy=replay-seed1"
    (stopped / "metrics.json").write_text('{"status": "failed"}')
    rewind_checkpoint(stopped, 0)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and f"resuming {stopped}" in printed
    for n in names:
        changed = (out / n / "metrics.json").stat().st_mtime_ns != stamps[n]
        assert changed == (n == "strategy=replay-seed1"), n
    assert json.loads((out / "strategy=replay-seed1" / "metrics.json").read_text())["status"] == "complete"

    # TensorBoard: the custom-scalars layout and the hparams of the run.
    events = EventAccumulator(str(out / "strategy=finetune-seed1"))
    events.Reload()
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["strategy"].string_value == "finetune" and start.hparams["seed"].number_value == 1


def test_sweep_validates_every_combination_before_running(tiny_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(tiny_config), "--seeds", "0", "--set", "strategy=replay,replai", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "strategy.name: unknown strategy 'replai'" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sweep_jobs_runs_processes_side_by_side_and_keeps_a_failure_in_its_run(tiny_config, tmp_path, capsys):
    """--jobs 2: each run in its own process gives the numbers the same run gives alone; a run
    that fails (a loss that turns NaN) is reported on its line and in its log, the others
    complete and are compared, and the sweep exits 1."""
    plugin = Path(__file__).parent / "plugins" / "killable.py"
    out = tmp_path / "sweep"
    code = main(["sweep", str(tiny_config), "--seeds", "1", "--jobs", "2", "--plugin", str(plugin),
                 "--set", "strategy=replay,replay_nan_in_second_experience", "--set", "training.epochs=1",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 1
    assert printed.err.count("\n") == 1 and "1 of 2 runs failed" in printed.err
    lines = printed.out.splitlines()
    assert sum("FAILED" in line and "the training loss became nan" in line for line in lines) == 1
    assert sum("] done " in line for line in lines) == 1 and (out / "comparison" / "report.md").is_file()
    assert "the training loss became nan" in (out / "logs" / "strategy=replay_nan_in_second_experience-seed1.log"
                                              ).read_text()
    alone = tmp_path / "alone"
    assert main(["run", str(tiny_config), "--quiet", "--out", str(alone), "--set", "strategy=replay",
                 "--set", "training.epochs=1", "--set", "seed=1"]) == 0
    parallel = json.loads((out / "strategy=replay-seed1" / "metrics.json").read_text())
    single = json.loads((alone / "metrics.json").read_text())
    # the processes run with cpu_count / jobs threads: sums may round differently, nothing more
    assert parallel["accuracy_matrix"] == single["accuracy_matrix"]
    assert parallel["prediction_matrix"] == single["prediction_matrix"]
    assert parallel["train_loss"] == pytest.approx(single["train_loss"], rel=1e-6)


def test_a_sweep_defaults_to_the_configs_seed_and_shows_each_runs_progress(tiny_config, tmp_path, capfd):
    """No --seeds: the config's own seed (TINY_RUN's 3, or a --set one), not 0; at --jobs 1 the
    run's per-experience lines and bars show while it runs."""
    out = tmp_path / "sweep"
    assert main(["sweep", str(tiny_config), "--set", "training.epochs=1", "--set", "output.tensorboard=false",
                 "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert sorted(p.name for p in out.iterdir() if p.name != "comparison") == ["seed3"]
    assert "    exp 0 of 0-2" in printed.out and "    exp 2 of 0-2" in printed.out
    assert "exp 0 train" in printed.err  # the training bar
    assert main(["sweep", str(tiny_config), "--set", "training.epochs=1", "--set", "seed=11", "--quiet",
                 "--set", "output.tensorboard=false", "--out", str(tmp_path / "other")]) == 0
    assert [p.name for p in (tmp_path / "other").iterdir() if p.name != "comparison"] == ["seed11"]
    assert capfd.readouterr().err == ""


def test_the_same_experiment_under_two_names_counts_once_and_is_named(runs, tmp_path, capsys):
    """The README's case: a sweep's strategy=replay-seed0 and a copy of it run on its own (another
    name, output folder and probe list) are one experiment: the group has its 2 seeds, not 3."""
    copy = write_run(tmp_path, "vit-replay", 0, "replay", MATRICES[("replay", 0)])
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config.update(name="vit-replay", probes=[{"name": "masking"}], output={**config["output"], "root": "elsewhere"})
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    other_seed = write_run(tmp_path, "replay-seed7", 7, "replay", MATRICES[("replay", 1)])
    assert main(["compare", *map(str, runs), str(copy), str(other_seed), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "strategy.name=replay       3" in printed  # seeds 0, 1 and 7; the copy of seed 0 once
    assert f"(counted once: {copy} repeats {runs[0]} (the same config and seed))" in printed
    assert f"counted once: {copy} repeats" in (tmp_path / "cmp" / "report.md").read_text()


def test_the_table_shows_task_il_accuracy_and_task_identification(runs, tmp_path, capsys):
    """Shown when a run has them: a comparison of runs recorded before they existed looks as it did."""
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "old")]) == 0
    assert "task-IL" not in capsys.readouterr().out
    paths = []
    for seed, (task_il, task_id) in enumerate(((92.0, 80.0), (94.0, 84.0))):
        path = write_run(tmp_path, f"new-replay-{seed}", seed, "replay", MATRICES[("replay", seed)])
        metrics = json.loads((path / "metrics.json").read_text())
        metrics.update(task_il_accuracy=[99.0, 95.0, task_il], task_identification=[100.0, 90.0, task_id])
        (path / "metrics.json").write_text(json.dumps(metrics))
        paths.append(path)
    assert main(["compare", *map(str, paths), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "last task-IL acc" in printed and "last task id" in printed
    assert main(["compare", *map(str, paths[:1]), str(write_run(tmp_path, "older", 1, "finetune", MATRICES[("finetune", 1)])),
                 "--out", str(tmp_path / "cmp2")]) == 0
    mixed = capsys.readouterr().out.splitlines()
    assert next(line for line in mixed if "finetune" in line).split()[-2:] == ["-", "-"]  # a run without them
    assert "93.00 ± 1.41" in printed and "82.00 ± 2.83" in printed  # the last steps' mean ± std over seeds
