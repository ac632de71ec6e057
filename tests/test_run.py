"""End-to-end runs on the real digits data with real Avalanche, timm and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_image_folder

from incremental.cli import main
from incremental.config import load_config
from incremental.data import build_dataset
from incremental.errors import UserError
from incremental.metrics import summarize
from incremental.protocol import make_class_split
from incremental.registry import STRATEGIES
from incremental.strategy import StrategyPlugin


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from conftest import TINY_RUN

    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.yaml"
    config.write_text(TINY_RUN)
    out = root / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    return out


def test_metrics_follow_from_the_accuracy_matrix(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["completed_experiences"] == 3
    matrix = metrics["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3]
    recomputed = json.loads(json.dumps(summarize(matrix, metrics["test_samples_per_experience"])))
    for key, value in recomputed.items():
        assert metrics[key] == value, key
    assert len(metrics["wall_time_s"]) == 3 and all(t["train"] > 0 for t in metrics["wall_time_s"])
    assert metrics["accuracy"][0] > 40  # 4 classes, chance is 25%: the model did learn
    assert set(metrics["definitions"]) >= {"forgetting", "bwt", "accuracy"}


def test_classes_and_memory_match_the_protocol(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    cfg, _ = load_config(str(tiny_run / "config.yaml"))
    split = make_class_split(cfg.protocol, 10, cfg.seed)
    assert metrics["class_order"] == list(split.class_order)
    assert metrics["experiences"] == split.experiences and [len(e) for e in split.experiences] == [4, 3, 3]
    digits = build_dataset("digits", cfg.dataset.config)
    per_exp = [sum(t in exp for t in digits.train.targets) for exp in split.experiences]
    per_exp_test = [sum(t in exp for t in digits.test.targets) for exp in split.experiences]
    assert metrics["test_samples_per_experience"] == per_exp_test
    # the replayed memory (30 exemplars in total) joins every experience after the first
    assert metrics["train_samples"] == [per_exp[0], per_exp[1] + 30, per_exp[2] + 30]


def test_resolved_config_is_saved(tiny_run):
    cfg, _ = load_config(str(tiny_run / "config.yaml"))
    assert cfg.name == "tiny" and cfg.protocol.memory.total == 30 and cfg.backbone.config.embed_dim == 32


def test_tensorboard_steps_are_experience_indices(tiny_run):
    events = EventAccumulator(str(tiny_run), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("cil/accuracy", "cil/average_incremental_accuracy", "cil/accuracy_new",
                "cil/task_il_accuracy", "cil/task_identification", "accuracy_per_experience/exp_00", "train/loss"):
        assert [e.step for e in events.Scalars(tag)] == [0, 1, 2], tag
    for tag in ("cil/forgetting", "cil/bwt", "cil/accuracy_old",  # undefined at step 0
                "bias/old_predicted_as_new", "bias/head_norm_ratio"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert [e.step for e in events.Scalars("accuracy_per_experience/exp_02")] == [2]
    assert {"accuracy_per_experience/exp_01", "accuracy_per_experience/exp_02"} <= scalars
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert [e.value for e in events.Scalars("cil/accuracy")] == pytest.approx(metrics["accuracy"], rel=1e-6)
    for tag, key in (("cil/task_il_accuracy", "task_il_accuracy"), ("cil/task_identification", "task_identification")):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx(metrics[key], rel=1e-6), tag
    assert all(a <= min(t, i) + 1e-9 for a, t, i in zip(metrics["accuracy"], metrics["task_il_accuracy"],
                                                         metrics["task_identification"]))
    assert [e.value for e in events.Scalars("cil/forgetting")] == \
        pytest.approx(metrics["forgetting"]["per_step"][1:], rel=1e-6)
    assert [e.value for e in events.Scalars("bias/head_norm_ratio")] == \
        pytest.approx(metrics["head_norm_ratio"][1:], rel=1e-6)
    images = events.Images("cil/accuracy_matrix")
    assert [i.step for i in images] == [0, 1, 2] and images[-1].width > 100


def test_an_existing_run_is_never_overwritten(tiny_run, capsys):
    before = (tiny_run / "metrics.json").read_text()
    assert main(["run", str(tiny_run / "config.yaml"), "--out", str(tiny_run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tiny_run / "metrics.json").read_text() == before


def test_finetune_on_resnet32_prints_the_table(tiny_config, tmp_path, capsys):
    out = tmp_path / "ft"
    code = main(["run", str(tiny_config), "--out", str(out), "--set", "strategy=finetune",
                 "--set", "backbone={name: resnet32, width: 4}", "--set", "training.epochs=1",
                 "--set", "protocol.increment=6", "--set", "training.scheduler.name=step",
                 "--set", "training.scheduler.milestones=[1]"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "exp 1 of 0-1" in stdout and "average incremental accuracy" in stdout and "forget" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == "resnet32" and metrics["strategy"] == "finetune"
    digits = build_dataset("digits", load_config(str(out / "config.yaml"))[0].dataset.config)
    per_exp = [sum(t in exp for t in digits.train.targets) for exp in metrics["experiences"]]
    assert metrics["train_samples"] == per_exp  # finetune replays nothing


class FailsInSecondExperience(UserError):
    pass


@STRATEGIES.register("test_fails_in_second_experience")
class _FailingStrategy(StrategyPlugin):
    """Test-only: stops the run during experience 1."""

    def before_training_exp(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            raise FailsInSecondExperience("deliberate failure", key="strategy.name")


def test_a_run_that_fails_midway_keeps_finished_experiences(tiny_config, tmp_path, capsys):
    out = tmp_path / "fails"
    code = main(["run", str(tiny_config), "--out", str(out), "--quiet",
                 "--set", "strategy=test_fails_in_second_experience", "--set", "training.epochs=1"])
    assert code == 2
    # the strategy was chosen on the command line, so the error names that flag
    assert capsys.readouterr().err.strip() == \
        "--set strategy=test_fails_in_second_experience: strategy.name: deliberate failure; " \
        f"continue with `incremental run --resume {out}`"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["completed_experiences"] == 1
    assert len(metrics["accuracy_matrix"]) == 1


def test_a_diverging_loss_stops_with_a_clear_message(tiny_config, tmp_path, capsys):
    code = main(["run", str(tiny_config), "--out", str(tmp_path / "nan"), "--quiet",
                 "--set", "training.optimizer={name: sgd, lr: 100}", "--set", "training.epochs=1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "training.optimizer.lr: the training loss became nan" in err or "became inf" in err
    assert "\n" not in err


def test_quiet_prints_nothing(tiny_config, tmp_path, capsys):
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "q"), "--quiet",
                 "--set", "training.epochs=1", "--set", "protocol.initial_classes=10"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_cuda_request_without_a_gpu_is_a_config_error(tiny_config, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "c"), "--set", "training.device=cuda"]) == 2
    assert "training.device: cuda requested but no CUDA device" in capsys.readouterr().err


def test_unreadable_image_in_a_worker_is_one_line(write_yaml, tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    (root / "val" / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    config = write_yaml(f"""
        dataset: {{name: imagefolder, root: {root}, image_size: 16}}
        protocol: {{increment: 1, class_order: sorted}}
        backbone: {{name: resnet32, width: 4}}
        training: {{epochs: 1, num_workers: 1}}
        """)
    assert main(["run", str(config), "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{config}: dataset.root: cannot read image ") and "broken.png" in err
    assert "\n" not in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["completed_experiences"] == 1


def test_training_threads_sets_torchs_threads_for_the_run_and_restores_them(tmp_path):
    """training.threads: the run's intra-op threads (recorded per experience next to the wall
    times), and the caller's count again afterwards; unset, torch's default is left alone."""
    import torch

    from conftest import run_tiny

    before = torch.get_num_threads()
    metrics = run_tiny(tmp_path, "one", "training.epochs=1", "training.threads=1", "protocol.increment=6")
    assert metrics["torch_threads"] == [1, 1] and torch.get_num_threads() == before
    torch.set_num_threads(2)
    try:
        assert run_tiny(tmp_path, "default", "training.epochs=1", "protocol.increment=6")["torch_threads"] == [2, 2]
    finally:
        torch.set_num_threads(before)
