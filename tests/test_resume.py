"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends with the metrics and
weights of an uninterrupted run; the same seed gives the same run; checkpoints load with
weights_only and a NaN loss keeps the last good one."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import (TINY_RUN, comparable, main_in_fork, resume_from_first_checkpoint, rewind_checkpoint,
                      same_weights, wait_for_fork)

from incremental.checkpoint import load_checkpoint
from incremental.run.directory import CHECKPOINT_FILE
from incremental.cli import main
from incremental.errors import UserError

KILLABLE = Path(__file__).parent / "plugins" / "killable.py"


# ------------------------------------------------------------------ SIGKILL, then --resume

KILLABLE_RUN = f"""
extends: tiny.yaml
plugins: [{KILLABLE}]
strategy:
  name: vitil_killable
  balanced_finetuning: {{epochs: 2}}
training:
  epochs: 2
  batch_size: 16
  eval_batch_size: 128
  optimizer: {{name: adamw, lr: 3.0e-3}}
probes: [{{name: masking, num_samples: 40}}]
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kill")
    (root / "tiny.yaml").write_text(TINY_RUN)
    config = root / "killable.yaml"
    config.write_text(KILLABLE_RUN)
    errors = root / "stderr"
    assert main_in_fork("run", str(config), "--out", str(root / "uninterrupted"), stderr=errors) == 0, errors.read_text()
    return config, root / "uninterrupted"


def kill_from_outside_after_first_checkpoint(config: Path, run_dir: Path) -> int:
    """SIGKILL sent by another process as soon as experience 0's checkpoint appears, whatever
    the run is doing then (starting experience 1, writing logs)."""
    pid = main_in_fork("run", str(config), "--out", str(run_dir), wait=False)
    deadline = time.monotonic() + 300
    while not (run_dir / CHECKPOINT_FILE).exists() and not _ended(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return wait_for_fork(pid)


def _ended(pid: int) -> bool:
    """Whether the child has exited (not reaped: wait_for_fork still reads its status)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


@pytest.mark.parametrize("kill_at", ["1:train:5", "1:eval:0", "0:train:3", "outside"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, kill_at):
    config, reference = uninterrupted
    run_dir = tmp_path / "killed"
    if kill_at == "outside":
        assert kill_from_outside_after_first_checkpoint(config, run_dir) == -9
        experience = load_checkpoint(run_dir / CHECKPOINT_FILE)["experience"] + 1
        assert experience < 3, "the run finished before the kill"
    else:
        killed = main_in_fork("run", str(config), "--out", str(run_dir), env={"INCREMENTAL_TEST_KILL_AT": kill_at},
                              stderr=tmp_path / "killed.err")
        assert killed == -9, (tmp_path / "killed.err").read_text()  # died by SIGKILL, no clean-up ran
        experience = int(kill_at.split(":")[0])
        if experience > 0:
            assert load_checkpoint(run_dir / CHECKPOINT_FILE)["experience"] == experience - 1
        else:
            assert not (run_dir / CHECKPOINT_FILE).exists()
    # a kill during a write leaves a partial temporary file, which is never read
    (run_dir / (CHECKPOINT_FILE + ".tmp")).write_bytes(b"partial")
    resumed = main_in_fork("run", "--resume", str(run_dir), "--plugin", str(KILLABLE), stderr=tmp_path / "resumed.err")
    assert resumed == 0, (tmp_path / "resumed.err").read_text()
    assert comparable(run_dir) == comparable(reference)  # bit-identical floats, through JSON
    assert same_weights(run_dir, reference)
    verb = "resumed at" if experience else "restarted from"  # no checkpoint yet: experience 0 again, in place
    assert f"{verb} experience {experience}" in (run_dir / "resume.log").read_text()


def test_resuming_a_complete_run_changes_nothing(uninterrupted, tmp_path, capsys):
    _, reference = uninterrupted
    copy = shutil.copytree(reference, tmp_path / "copy")
    before = (copy / "metrics.json").read_text()
    assert main(["run", "--resume", str(copy), "--plugin", str(KILLABLE)]) == 0
    assert "the run is complete" in capsys.readouterr().out
    assert (copy / "metrics.json").read_text() == before


def test_checkpoint_loads_with_weights_only(uninterrupted):
    _, reference = uninterrupted
    state = torch.load(reference / CHECKPOINT_FILE, weights_only=True)
    assert state["experience"] == 2 and state["num_classes"] == 10
    memory = state["plugins"][0]["exemplars"]
    assert sum(len(indices) for _, indices in memory.values()) == 30  # protocol.memory.total
    assert all(isinstance(i, int) for _, indices in memory.values() for i in indices)  # dataset indices
    assert state["optimizer"]["param_groups"] and state["scheduler"]["name"] == "cosine"
    assert {"torch", "numpy", "python", "cuda"} <= set(state["rng"])
    assert len(json.loads(state["results"])["matrix"]) == 3


def test_a_resumed_writer_replaces_what_the_stopped_one_logged(tmp_path):
    """Steps the stopped run logged after its checkpoint are redone; TensorBoard keeps one value
    per step, the resumed run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from incremental.tensorboard import TensorBoardWriter

    stopped = TensorBoardWriter(tmp_path, {"seed": 1})
    for step in range(3):
        stopped.writer.add_scalar("cil/accuracy", 10.0 + step, global_step=step)
    stopped.close()
    time.sleep(1.1)  # event files are named by the second they are opened in
    resumed = TensorBoardWriter(tmp_path, {"seed": 1}, purge_step=1)
    for step in (1, 2):
        resumed.writer.add_scalar("cil/accuracy", 20.0 + step, global_step=step)
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("cil/accuracy")] == [(0, 10.0), (1, 21.0), (2, 22.0)]


# ------------------------------------------------------------------ every strategy's state

PTM_SETUP = "backbone: {global_pool: token}\nprotocol: {memory: {}}"
STRATEGY_CASES = {
    "replay": "strategy: {name: replay, selection: random}",
    "vitil": "strategy: {name: vitil, balanced_finetuning: {epochs: 1}}",
    "icarl": "strategy: {name: icarl}",
    "der": "strategy: {name: der}",
    "lwf": "strategy: lwf",
    "ewc": "strategy: {name: ewc, ewc_lambda: 10.0}",
    "ewc_online": "strategy: {name: ewc, ewc_lambda: 10.0, mode: online, decay_factor: 0.5}",
    "finetune": "strategy: finetune",
    # fp16: the GradScaler's loss scale carries over experiences
    "vitil_fp16": "strategy: {name: vitil, balanced_finetuning: {epochs: 1}}\ntraining: {precision: fp16}",
    # the device data path draws its shuffles and crops from the restored generator too
    "replay_device_data": "strategy: replay\ntraining: {data_path: device}",
    # memories in bytes: encoded payloads (JPEG files, NeRV's 8-bit weights) and the GAN's
    # generator go into the checkpoint as tensors
    "replay_jpeg": "protocol: {memory: {bytes: 6000, codec: {name: jpeg, quality: 40}}}",
    "replay_nerv": "protocol: {memory: {bytes: 6000, codec: {name: nerv, steps: 10, finetune_steps: 3, max_width: 6}}}",
    "grad_reweight": "protocol: {memory: {total: 30}}\nstrategy: {name: grad_reweight}",
    "coil": "protocol: {memory: {total: 30}}\nstrategy: {name: coil}",
    "memo": "protocol: {memory: {total: 30}}\nstrategy: {name: memo}",
    "expandable_representation": "protocol: {memory: {total: 30}}\nstrategy: {name: expandable_representation}",
    # the compressed student (the next experience's start) goes into the checkpoint
    "foster": "protocol: {memory: {total: 30}}\nstrategy: {name: foster, compression_epochs: 1}",
    "gan_replay": "protocol: {memory: {bytes: 60000}}\n"
                  "strategy: {name: gan_replay, steps: 3, batch_size: 8, quality_samples: 4}",
    # the pre-trained-model methods: RanPAC's G, Q and projection, SLCA's Gaussians, the prompt
    # pools and EASE's adapters and prototypes carry over (here on an encoder trained by its seed)
    **{name: f"{PTM_SETUP}\nstrategy: {spec}" for name, spec in {
        "ranpac": "{name: ranpac, projection_dim: 64}",
        "aper": "{name: aper, tuning: {name: adapter, bottleneck: 4}}",
        "slca": "{name: slca, ca_samples_per_class: 8}",
        "cofima": "{name: cofima, ca_samples_per_class: 8}",
        "l2p": "{name: l2p, pool_size: 4, length: 2, top_k: 2}",
        "codaprompt": "{name: codaprompt, pool_size: 6, length: 2, layers: [0]}",
        "ease": "{name: ease, bottleneck: 4}",
        "dsal": "{name: dsal, expansion_size: 64, rls_batch_size: 20}",
        "fecam": "{name: fecam, tuning: {name: adapter, bottleneck: 4}}",
        "inflora": "{name: inflora, rank: 2}",
        "lae": "{name: lae, tuning: {name: prefix, length: 2}, freeze_epochs: 0}",
        "mos": "{name: mos, bottleneck: 4, ca_epochs: 2, ca_samples_per_class: 8}"}.items()},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_CASES))
def test_every_strategy_resumes_to_the_same_result(write_yaml, tmp_path, strategy):
    """A stop after experience 0 (its archived checkpoint in a fresh directory) and --resume
    reproduce the run: memory, teachers, class means, stored logits, Fisher terms all restored."""
    write_yaml(TINY_RUN, "tiny.yaml")
    config = write_yaml("extends: tiny.yaml\n" + STRATEGY_CASES[strategy] + "\n", "strategy.yaml")
    full = tmp_path / "full"
    sets = ["--set", "training.epochs=1", "--set", "output.checkpoint=all", "--set", "output.tensorboard=false"]
    assert main(["run", str(config), "--out", str(full), "--quiet", *sets]) == 0
    stopped = tmp_path / "stopped"
    resume_from_first_checkpoint(full, stopped)
    assert comparable(stopped) == comparable(full)
    assert same_weights(stopped, full)


def test_a_strategy_whose_state_cannot_be_checkpointed_refuses_to_resume(write_yaml, tmp_path, capsys):
    write_yaml(TINY_RUN, "tiny.yaml")
    config = write_yaml("extends: tiny.yaml\nstrategy: gdumb\n", "gdumb.yaml")
    run_dir = tmp_path / "gdumb"
    assert main(["run", str(config), "--out", str(run_dir), "--quiet", "--set", "training.epochs=1",
                 "--set", "output.tensorboard=false"]) == 0
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0  # complete: nothing to do
    rewind_checkpoint(run_dir, 0)  # as if it had stopped after the first experience
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{run_dir / 'config.yaml'}: strategy.name: this strategy keeps state") \
        and "GDumbPlugin" in err and "\n" not in err


# ------------------------------------------------------------------ determinism


def test_same_seed_same_run_other_seed_other_run(tiny_config, tmp_path):
    """``seed`` fixes class order, initialisation, data order and augmentation (random crops):
    two runs agree to the bit; another seed changes the order and the weights."""
    sets = ["--quiet", "--set", "training.epochs=2", "--set", "output.tensorboard=false"]
    # b also checks that torch's deterministic mode changes nothing on the CPU
    for name, seed, deterministic in (("a", 3, False), ("b", 3, True), ("c", 4, False)):
        assert main(["run", str(tiny_config), "--out", str(tmp_path / name), "--set", f"seed={seed}",
                     "--set", f"training.deterministic={str(deterministic).lower()}", *sets]) == 0
    assert comparable(tmp_path / "a") == comparable(tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert comparable(tmp_path / "a")["class_order"] != comparable(tmp_path / "c")["class_order"]
    assert not same_weights(tmp_path / "a", tmp_path / "c")


def test_seed_alone_changes_initialisation_and_data_order(tiny_config, tmp_path):
    """With the class order fixed, a different seed still gives other weights and losses:
    the seed reaches initialisation, shuffling and augmentation, not only the class order."""
    sets = ["--quiet", "--set", "training.epochs=1", "--set", "output.tensorboard=false",
            "--set", "protocol.class_order=sorted"]
    for name, seed in (("a", 3), ("b", 4)):
        assert main(["run", str(tiny_config), "--out", str(tmp_path / name), "--set", f"seed={seed}", *sets]) == 0
    a, b = comparable(tmp_path / "a"), comparable(tmp_path / "b")
    assert a["class_order"] == b["class_order"]
    assert a["train_loss"] != b["train_loss"]


# ------------------------------------------------------------------ numerical faults


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    code = main(["run", str(tiny_config), "--out", str(run_dir), "--quiet", "--plugin", str(KILLABLE),
                 "--set", "strategy=replay_nan_in_second_experience", "--set", "training.epochs=1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "training.optimizer.lr: the training loss became nan in experience 1, epoch 1" in err
    assert err.endswith(f"continue with `incremental run --resume {run_dir}`")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    assert checkpoint["experience"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["completed_experiences"] == 1


# ------------------------------------------------------------------ safety


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_code_is_refused_unrun(uninterrupted, tmp_path, capsys):
    _, reference = uninterrupted
    run_dir = shutil.copytree(reference, tmp_path / "tampered")
    rewind_checkpoint(run_dir, 0)
    state = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    marker = tmp_path / "code-ran"
    state["plugins"] = [_Payload(marker)]
    torch.save(state, run_dir / CHECKPOINT_FILE)
    with pytest.raises(UserError, match=r"refused unread \(it would import getattr; torch"):
        load_checkpoint(run_dir / CHECKPOINT_FILE)
    assert main(["run", "--resume", str(run_dir), "--quiet", "--plugin", str(KILLABLE)]) == 2
    assert "holds objects, not just tensors, and was refused unread" in capsys.readouterr().err
    assert not marker.exists()


def test_refusing_a_pickle_is_one_line_and_torch_speaks_only_under_verbose(uninterrupted, tmp_path):
    """A plain pickle (protocol 4) makes torch warn in several lines before refusing; the console
    shows the toolkit's one line, and torch's warning and message only with --verbose."""
    _, reference = uninterrupted
    run_dir = shutil.copytree(reference, tmp_path / "tampered")
    rewind_checkpoint(run_dir, 0)
    marker = tmp_path / "code-ran"
    with (run_dir / CHECKPOINT_FILE).open("wb") as file:
        pickle.dump({"kind": "incremental-checkpoint", "plugins": [_Payload(marker)]}, file, protocol=4)
    quiet, verbose = tmp_path / "quiet.err", tmp_path / "verbose.err"
    assert main_in_fork("run", "--resume", str(run_dir), "--plugin", str(KILLABLE), stderr=quiet) == 2
    assert not marker.exists()
    lines = quiet.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"--resume: {run_dir / CHECKPOINT_FILE} holds objects, not just tensors")
    assert main_in_fork("run", "--resume", str(run_dir), "--verbose", "--plugin", str(KILLABLE), stderr=verbose) == 2
    assert verbose.read_text().splitlines()[0] == lines[0]
    assert "Detected pickle protocol 4" in verbose.read_text() and "Weights only load failed" in verbose.read_text()


def test_yaml_tags_that_build_objects_are_refused(write_yaml, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    config = write_yaml(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["run", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{config}: ") and "invalid YAML" in err and "\n" not in err
    assert not marker.exists()
