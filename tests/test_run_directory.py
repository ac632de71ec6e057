"""The run directory has one owner (incremental.run.directory): a kill at any write boundary
resumes to the uninterrupted result, a second run into a held directory is refused, damaged
checkpoint fields are one line each, sweeps never reuse or delete another config's runs, a run
folder never runs code unasked, and a full disk is one line that keeps what was finished."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, comparable, main_in_fork, rewind_checkpoint, same_weights, wait_for_fork

from incremental.cli import main
from incremental.run.directory import (CHECKPOINT_FILE, LOCK_FILE, RunDirectory, RunLock, lock_holder, read_state,
                                       reuse_decision)

FAULTS = Path(__file__).parent / "plugins" / "write_faults.py"
FAST = ["--set", "training.epochs=1", "--set", "output.tensorboard=true"]


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """tiny.yaml and its uninterrupted run (1 epoch, TensorBoard on, the fault plugin loaded)."""
    root = tmp_path_factory.mktemp("reference")
    config = root / "tiny.yaml"
    config.write_text(TINY_RUN)
    assert main_in_fork("run", str(config), "--out", str(root / "whole"), "--plugin", str(FAULTS), *FAST) == 0
    return config, root / "whole"


# ------------------------------------------------------------------ a kill at every write boundary

@pytest.mark.parametrize("kill_at", ["0:tensorboard", "0:checkpoint", "0:model", "0:metrics", "1:checkpoint"])
def test_a_kill_at_a_write_boundary_resumes_to_the_uninterrupted_run(reference, tmp_path, kill_at):
    """Experience 0 killed after metrics.json was written but before anything else was the
    lost-run defect; every boundary now resumes, through --resume alone."""
    config, whole = reference
    run_dir = tmp_path / "killed"
    assert main_in_fork("run", str(config), "--out", str(run_dir), "--plugin", str(FAULTS), *FAST,
                        env={"INCREMENTAL_TEST_KILL_AT_WRITE": kill_at}) == -9
    state = read_state(run_dir)
    assert state.status == "stopped"  # the dead process holds no lock
    experience, boundary = kill_at.split(":")
    claimed = json.loads((run_dir / "metrics.json").read_text())["completed_experiences"] \
        if (run_dir / "metrics.json").exists() else 0
    # metrics.json never claims an experience whose checkpoint is not on disk
    checkpointed = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)["experience"] + 1 \
        if (run_dir / CHECKPOINT_FILE).exists() else 0
    assert claimed <= checkpointed
    assert checkpointed == int(experience) + (boundary != "tensorboard")
    assert main_in_fork("run", "--resume", str(run_dir), "--plugin", str(FAULTS)) == 0
    assert comparable(run_dir) == comparable(whole)
    assert same_weights(run_dir, whole)
    assert read_state(run_dir).status == "complete"
    assert not list(run_dir.rglob("*.tmp"))


# ------------------------------------------------------------------ one process per directory

def test_a_second_run_into_a_held_directory_is_refused(reference, tmp_path, capsys):
    config, _ = reference
    run_dir, release = tmp_path / "held", tmp_path / "release"
    first = main_in_fork("run", str(config), "--out", str(run_dir), "--plugin", str(FAULTS), *FAST, wait=False,
                         env={"INCREMENTAL_TEST_PAUSE_AT_WRITE": f"0:metrics:{release}"})
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        state = read_state(run_dir)
        assert state.status == "running" and state.holder["pid"] == first and state.completed == 1
        assert main(["run", str(config), "--out", str(run_dir), "--quiet"]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"--out: {run_dir} is in use by process {first}") and "\n" not in line
        assert main(["run", "--resume", str(run_dir), "--quiet", "--trust-plugins"]) == 2
        assert f"is in use by process {first}" in capsys.readouterr().err
    finally:
        release.touch()
        assert wait_for_fork(first) == 0
    assert main(["run", str(config), "--out", str(run_dir), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"--out: {run_dir} already holds a run (complete); choose another --out"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "complete"


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "then"}))
    assert lock_holder(tmp_path) is None  # nobody holds it: the file alone means nothing
    lock = RunLock.acquire(tmp_path, key="--out")
    try:
        lock.record_holder()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock_holder(tmp_path)["pid"] == os.getpid()  # seen from another open file
    finally:
        lock.release()
    assert lock_holder(tmp_path) is None


# ------------------------------------------------------------------ damaged checkpoints

def _set(path: str, value):
    def mutate(state: dict) -> None:
        node = state
        *parents, last = path.split(".")
        for part in parents:
            node = node[part] if not part.isdigit() else node[int(part)]
        if value is KeyError:
            del node[last]
        else:
            node[last if not last.isdigit() else int(last)] = value
    return mutate


DAMAGE = [
    ("missing rng", _set("rng", KeyError), "rng: is missing"),
    ("rng keys of the wrong size", _set("rng.numpy.keys", torch.zeros(3, dtype=torch.int64)), "rng.numpy.keys: expected 624"),
    ("results that are not JSON", _set("results", "{not json"), "results: is not JSON"),
    ("results of the wrong length", _set("results", json.dumps({"matrix": [], "steps": []})), "results: holds 0 rows"),
    ("experience that is not a number", _set("experience", "one"), "experience: expected an integer, found str"),
    ("experience out of range", _set("experience", 7), "experience: is 7, outside 0..2"),
    ("model that is not a state dict", _set("model", [1, 2]), "model: expected a state dict"),
    ("missing clock counter", _set("clock.train_iterations", KeyError), "clock.train_iterations: is missing"),
    ("plugin entry of the wrong type", _set("plugins.0", "garbled"), "plugins.0: expected a state dict or null"),
    ("plugin state its plugin cannot read", _set("plugins.0", {"exemplars": {"3": "x"}}),
     "plugins.0: ExemplarReplay cannot load this state"),
    ("missing config", _set("config", KeyError), "config: is missing"),
]


@pytest.mark.parametrize("case, damage, expected", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_each_damaged_checkpoint_field_is_one_line(reference, tmp_path, capsys, case, damage, expected):
    _, whole = reference
    run_dir = tmp_path / "damaged"
    import shutil

    shutil.copytree(whole, run_dir)
    rewind_checkpoint(run_dir, 0)
    path = run_dir / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    before = files_of(run_dir)
    assert main(["run", "--resume", str(run_dir), "--quiet", "--trust-plugins"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{path}: {expected}"), lines[0]
    assert "incremental run --resume" not in lines[0]  # resuming again would fail the same way
    assert files_of(run_dir).keys() == before.keys() and files_of(run_dir)[CHECKPOINT_FILE] == before[CHECKPOINT_FILE]


# ------------------------------------------------------------------ sweeps

def test_a_sweep_with_another_config_refuses_and_deletes_nothing(tiny_config, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(tiny_config), "--seeds", "1", "--out", str(out), "--set", "output.tensorboard=false"]
    assert main([*args, "--set", "training.epochs=1"]) == 0
    run_dir = out / "seed1"
    (run_dir / "my-notes.txt").write_text("mine")
    before = files_of(run_dir)
    capsys.readouterr()
    assert main([*args, "--set", "training.epochs=2"]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert "\n" not in line and line.startswith(f"--out: {run_dir} holds a run of another config "
                                                "(training.epochs: 1 there, 2 here)"), line
    assert f"refused {run_dir}" in captured.out
    assert files_of(run_dir) == before  # kept whole, the user's file too
    # the same config again: kept, and said so
    assert main([*args, "--set", "training.epochs=1"]) == 0
    assert f"kept {run_dir} (complete)" in capsys.readouterr().out


def test_a_sweep_resumes_a_stopped_run_of_its_config_and_refuses_other_folders(reference, tmp_path, capfd):
    config, whole = reference
    out = tmp_path / "sweep"
    args = ["sweep", str(config), "--seeds", "3", "--out", str(out), "--plugin", str(FAULTS), *FAST]
    assert main_in_fork(*args, env={"INCREMENTAL_TEST_KILL_AT_WRITE": "1:checkpoint"}) == -9
    assert reuse_decision(out / "seed3", _cfg(config, "seed=3", "training.epochs=1"))[0] == "resume"
    capfd.readouterr()
    assert main_in_fork(*args, quiet=False) == 0
    assert f"resume {out / 'seed3'} (stopped after exp 0 of 0-2)" in capfd.readouterr().out
    assert comparable(out / "seed3") == comparable(whole)  # seed 3 is tiny.yaml's own
    # a folder that is not a run is never used, and never deleted
    (out / "seed4").mkdir()
    (out / "seed4" / "data.bin").write_bytes(b"x")
    assert main_in_fork(*args[:3], "4", *args[4:]) == 2
    assert "seed4 holds files but no run (config.yaml missing)" in capfd.readouterr().err
    assert (out / "seed4" / "data.bin").read_bytes() == b"x"


def _cfg(config: Path, *overrides: str):
    from incremental.config import load_config

    return load_config(str(config), overrides)[0]


# ------------------------------------------------------------------ code from a run folder

PLANTED = """
from pathlib import Path
from incremental.registry import STRATEGIES
from incremental.strategies.replay import ExemplarReplay, ReplayConfig

Path(__file__).with_name("IMPORTED").write_text("the plugin ran")


@STRATEGIES.register("planted_replay", config=ReplayConfig)
class PlantedReplay(ExemplarReplay):
    \"\"\"Replay, from a plugin file that leaves a mark when imported.\"\"\"
"""


def test_a_run_folder_runs_no_code_unless_asked(tiny_config, tmp_path, capfd):
    plugin = tmp_path / "planted.py"
    plugin.write_text(PLANTED)
    marker = tmp_path / "IMPORTED"
    run_dir = tmp_path / "shared-run"
    # made in a child process, so this process has not imported the plugin when it probes below
    assert main_in_fork("run", str(tiny_config), "--out", str(run_dir), "--plugin", str(plugin),
                        "--set", "strategy=planted_replay", "--set", "training.epochs=1",
                        "--set", "output.tensorboard=false",
                        "--set", "probes=[{name: masking, num_samples: 20}]") == 0
    rewind_checkpoint(run_dir, 0)
    capfd.readouterr()
    for argv in (["probe", str(run_dir), "--out", str(tmp_path / "p.json")], ["run", "--resume", str(run_dir)]):
        marker.unlink(missing_ok=True)
        assert main_in_fork(*argv) == 2
        line = capfd.readouterr().err.strip()
        assert "\n" not in line and line.startswith(f"{run_dir / 'config.yaml'}: plugins: ") and str(plugin) in line
        assert not marker.exists()  # refused before anything was imported
    # named again, or trusted: it runs
    assert main_in_fork("probe", str(run_dir), "--out", str(tmp_path / "p.json"), "--plugin", str(plugin)) == 0
    assert marker.exists()
    assert main_in_fork("run", "--resume", str(run_dir), "--trust-plugins") == 0
    assert read_state(run_dir).status == "complete"


# ------------------------------------------------------------------ write failures

def _fail_writes_to(monkeypatch, name: str, code: int = errno.ENOSPC, after: int = 0) -> None:
    """os.replace of a file called ``name`` raises OSError(code) (after ``after`` successes):
    the write of that file fails as on a full disk, after its temporary file was written."""
    import incremental.files as files

    real = os.replace
    seen = {"n": 0}

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("name, after, code, completed, status", [
    ("checkpoint.pt", 1, errno.ENOSPC, 1, "failed"),      # experience 1's checkpoint: 0 is kept
    ("metrics.json", 1, errno.ENOSPC, 1, "stopped"),      # not even status: failed can be written
    ("model.safetensors", 0, errno.EIO, 1, "failed"),     # experience 0 is checkpointed: kept
    ("checkpoint.pt", 0, errno.EACCES, 0, None),          # nothing complete yet
])
def test_a_write_failure_is_one_line_and_keeps_what_was_finished(reference, tiny_config, tmp_path, capsys, one_thread,
                                                                 monkeypatch, name, after, code, completed, status):
    _, whole = reference
    run_dir = tmp_path / "full"
    _fail_writes_to(monkeypatch, name, code, after)
    assert main(["run", str(tiny_config), "--out", str(run_dir), "--quiet", *FAST]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{run_dir / name}: cannot write ({os.strerror(code)}, {errno.errorcode[code]})")
    monkeypatch.undo()
    if not completed:  # a new run with nothing complete leaves nothing behind: the same command works again
        assert not run_dir.exists() and "--resume" not in lines[0]
        return
    assert lines[0].endswith(f"; continue with `incremental run --resume {run_dir}`")
    assert not list(run_dir.rglob("*.tmp"))
    state = read_state(run_dir)
    assert (state.status, state.completed) == (status, completed)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert comparable(run_dir)["accuracy_matrix"] == comparable(whole)["accuracy_matrix"]
    assert same_weights(run_dir, whole)


def test_a_resume_hint_only_where_a_resume_works(tiny_config, tmp_path, capsys, monkeypatch):
    """With output.checkpoint: off there is nothing to resume from: no hint."""
    run_dir = tmp_path / "nockpt"
    _fail_writes_to(monkeypatch, "metrics.json", errno.ENOSPC, after=1)
    assert main(["run", str(tiny_config), "--out", str(run_dir), "--quiet", *FAST,
                 "--set", "output.checkpoint=off"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"{run_dir / 'metrics.json'}: cannot write") and "--resume" not in line
    monkeypatch.undo()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    assert "output.checkpoint: off and cannot be resumed" in capsys.readouterr().err


def test_an_interrupted_first_experience_leaves_nothing_and_says_so(tiny_config, tmp_path, capsys, monkeypatch):
    from incremental.run import loop

    def interrupt(built, i):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_experience", interrupt)
    run_dir = tmp_path / "ctrl-c"
    assert main(["run", str(tiny_config), "--out", str(run_dir), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == \
        "interrupted; stopped before the first experience was complete, nothing was kept"
    assert not run_dir.exists()


def test_an_interrupt_after_an_experience_keeps_it_and_says_how_to_continue(tiny_config, tmp_path, capsys,
                                                                             monkeypatch):
    from incremental.run import loop

    real = loop.train_experience

    def interrupt_second(built, i):
        if i == 1:
            raise KeyboardInterrupt
        return real(built, i)

    monkeypatch.setattr(loop, "train_experience", interrupt_second)
    run_dir = tmp_path / "ctrl-c"
    assert main(["run", str(tiny_config), "--out", str(run_dir), "--quiet", *FAST]) == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted; 1 complete experience(s) kept in {run_dir}; continue with `incremental run --resume {run_dir}`")
    assert (read_state(run_dir).status, read_state(run_dir).completed) == ("stopped", 1)


def test_a_stopped_run_reads_as_stopped_everywhere(reference, tmp_path, capsys):
    """A killed run's metrics.json still says running; readers ask the lock and say stopped."""
    import shutil

    _, whole = reference
    run_dir = tmp_path / "killed"
    shutil.copytree(whole, run_dir)
    rewind_checkpoint(run_dir, 0)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "status": "running", "completed_experiences": 1}))
    assert read_state(run_dir).label == "stopped after exp 0 of 0-2"
    assert main(["compare", str(run_dir), str(whole), "--out", str(tmp_path / "cmp")]) == 0
    assert f"{run_dir} (stopped after exp 0 of 0-2)" in capsys.readouterr().out


def test_run_directory_refuses_a_folder_in_use_in_process(tmp_path):
    directory = RunDirectory.create(tmp_path / "a", "name: a\n")
    try:
        with pytest.raises(Exception, match="is in use by process"):
            RunDirectory.create(tmp_path / "a", "name: a\n")
    finally:
        directory.close()
