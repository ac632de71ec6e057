"""Trackers beside TensorBoard (incremental.trackers): the CSV file, Weights & Biases in offline
mode and MLflow on a local file store, all the real libraries. Each test reads back what was
logged: W&B's transaction log through W&B's own protobuf records, MLflow through its client."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from conftest import TINY_RUN, rewind_checkpoint

from incremental.cli import main

FAST = ["--quiet", "--set", "training.epochs=1", "--set", "strategy=simplecil"]


def tiny_config(tmp_path: Path, loggers: str, extra: str = "") -> str:
    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    config = tmp_path / "tracked.yaml"
    config.write_text(f"extends: tiny.yaml\noutput: {{loggers: {loggers}, project: tests{extra}}}\n")
    return str(config)


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline transaction logs (``run-ID.wandb``), parsed with W&B's
    own ``Record`` protobuf: a 7-byte file header, then LevelDB-log blocks of 32 KiB whose
    chunks carry a CRC, a length and a type (full, first, middle, last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    records = []
    for log in sorted(run_dir.glob("wandb/*run-*/run-*.wandb")):
        data = log.read_bytes()
        assert data[:4] == b":W&B"
        position, pending = 7, b""
        while position + 7 <= len(data):
            block_left = 32768 - position % 32768
            if block_left < 7:  # a block's tail too short for a header is padding
                position += block_left
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            chunk = data[position + 7:position + 7 + length]
            position += 7 + length
            if kind == 0 and length == 0:
                continue
            pending += chunk
            if kind in (1, 4):  # full, or last of a sequence
                record = Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(records: list) -> dict[int, dict[str, object]]:
    """step -> the logged values (a table's are nested: {"cil/accuracy_matrix": {"path": ...}})."""
    history: dict[int, dict[str, object]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items: dict[str, object] = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                target = items
                for key in keys[:-1]:
                    target = target.setdefault(key, {})
                target[keys[-1]] = json.loads(item.value_json)
            history[int(items["_step"])] = items
    return history


def test_csv_has_a_row_per_experience_and_a_resume_keeps_each_once(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["run", tiny_config(tmp_path, "[csv]"), "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["experience"]) for r in rows] == [0, 1, 2]
    assert [float(r["cil/accuracy"]) for r in rows] == pytest.approx(metrics["accuracy"])
    assert float(rows[2]["accuracy_per_experience/exp_01"]) == pytest.approx(metrics["accuracy_matrix"][2][1])
    assert rows[0]["cil/forgetting"] == ""  # forgetting does not exist after the first experience
    assert not list(out.glob("events.out.tfevents*"))  # tensorboard is one logger among others
    stopped = tmp_path / "stopped"
    import shutil

    shutil.copytree(out, stopped)
    rewind_checkpoint(stopped, 0)
    assert main(["run", "--resume", str(stopped), "--quiet"]) == 0
    again = list(csv.DictReader((stopped / "metrics.csv").open()))
    assert [int(r["experience"]) for r in again] == [0, 1, 2]
    resumed = json.loads((stopped / "metrics.json").read_text())  # (a rewound checkpoint: other weights)
    assert [float(r["cil/accuracy"]) for r in again] == pytest.approx(resumed["accuracy"])


def test_wandb_offline_receives_config_steps_matrix_and_files_and_a_resume_continues_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(["run", tiny_config(tmp_path, "[wandb]", ", group: sweep-a"), "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    state = json.loads((out / "trackers.json").read_text())["wandb"]
    records = wandb_records(out)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == state["id"] and run.project == "tests" and run.run_group == "sweep-a"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["strategy"]["name"] == "simplecil" and config["seed"] == 3
    history = wandb_history(records)
    assert sorted(history) == [0, 1, 2]
    assert [history[i]["cil/accuracy"] for i in range(3)] == pytest.approx(metrics["accuracy"])
    table = history[2]["cil/accuracy_matrix"]
    assert table["_type"] == "table-file"
    (files_dir,) = out.glob("wandb/*run-*/files")
    logged = json.loads((files_dir / table["path"]).read_text())
    assert logged["data"] == [row + [None] * (3 - len(row)) for row in metrics["accuracy_matrix"]]
    (files,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
                and r.artifact.type == "incremental-run"]
    assert {"config.yaml", "metrics.json", "model.safetensors"} <= {entry.path for entry in files.manifest.contents}
    assert "exit" in kinds

    stopped = tmp_path / "stopped"
    import shutil

    shutil.copytree(out, stopped)
    rewind_checkpoint(stopped, 0)
    resumed_state = json.loads((stopped / "trackers.json").read_text())
    resumed_state["wandb"]["logged"] = 0  # as a process stopped after experience 0 left it
    (stopped / "trackers.json").write_text(json.dumps(resumed_state))
    assert main(["run", "--resume", str(stopped), "--quiet"]) == 0
    runs = {r.run.run_id for r in wandb_records(stopped) if r.WhichOneof("record_type") == "run"}
    assert runs == {state["id"]}  # the same W&B run, continued


def test_mlflow_file_store_receives_params_steps_matrix_and_files_under_a_sweep_parent(tmp_path, monkeypatch) -> None:
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    from mlflow.tracking import MlflowClient

    runs = []
    for seed in (3, 4):
        out = tmp_path / f"run{seed}"
        assert main(["run", tiny_config(tmp_path, "[mlflow, tensorboard]", ", group: sweep-b"), "--out", str(out),
                     *FAST, "--set", f"seed={seed}"]) == 0
        runs.append((out, json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]))
    client = MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("tests")
    parents = {client.get_run(run_id).data.tags["mlflow.parentRunId"] for _, run_id in runs}
    assert len(parents) == 1 and client.get_run(parents.pop()).data.tags["incremental.sweep"] == "sweep-b"
    out, run_id = runs[0]
    metrics = json.loads((out / "metrics.json").read_text())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == experiment.experiment_id
    assert run.data.params["strategy.name"] == "simplecil" and run.data.params["seed"] == "3"
    history = client.get_metric_history(run_id, "cil/accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i, pytest.approx(a)) for i, a in enumerate(metrics["accuracy"])]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "accuracy_matrix.json", "config.json"} <= artifacts
    matrix = json.loads(Path(client.download_artifacts(run_id, "accuracy_matrix.json", str(tmp_path))).read_text())
    assert matrix["accuracy_matrix"] == metrics["accuracy_matrix"]  # JSON both ways: the same floats
    assert list(out.glob("events.out.tfevents*"))

    import shutil

    stopped = tmp_path / "stopped"  # as a process stopped after experience 0 leaves the run
    shutil.copytree(out, stopped)
    rewind_checkpoint(stopped, 0)
    state = json.loads((stopped / "trackers.json").read_text())
    state["mlflow"]["logged"] = 0
    (stopped / "trackers.json").write_text(json.dumps(state))
    before = len(client.search_runs([experiment.experiment_id]))
    assert main(["run", "--resume", str(stopped), "--quiet"]) == 0
    assert len(client.search_runs([experiment.experiment_id])) == before  # the same MLflow run, continued
    steps = sorted(m.step for m in client.get_metric_history(run_id, "cil/accuracy"))
    assert steps == [0, 1, 1, 2, 2] and client.get_run(run_id).info.status == "FINISHED"
