"""Experiment trackers beside TensorBoard: a CSV file, Weights & Biases and MLflow.

``output.loggers`` chooses them. Each receives the resolved config, each experience's scalars
(:func:`incremental.metrics.step_scalars`, the tags TensorBoard shows) with the experience index
as the step, the accuracy matrix, and at the end the run's files (config.yaml, metrics.json,
model.safetensors, resume.log, probes.json) as artifacts.

A tracker's run id is kept in the run directory (``trackers.json``), with the last experience it
received, so ``incremental run --resume`` continues the same W&B or MLflow run and first sends
what a stopped process had recorded but not yet logged. A sweep sets ``output.group``: W&B's
run group, and in MLflow a parent run (found by its name, created once) that holds the sweep's
runs. Nothing is imported until a tracker is used, and a tracker's library that is missing is
one line naming the extra that installs it.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any

from .errors import ConfigError, first_line
from .files import write_json_atomic, write_text_atomic

STATE_FILE = "trackers.json"
ARTIFACT_FILES = ("config.yaml", "metrics.json", "model.safetensors", "resume.log", "probes.json")
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # logger: (module, extra)


def require_tracker_libraries(loggers: list[str], key: str = "output.loggers") -> None:
    """One line naming the extra for a chosen tracker whose library is not installed."""
    for i, logger in enumerate(loggers):
        if logger in EXTRAS and importlib.util.find_spec(EXTRAS[logger][0]) is None:
            module, extra = EXTRAS[logger]
            raise ConfigError(f"logger {logger!r} needs {module}, which is not installed: "
                              f"pip install \"incremental-vit[{extra}]\"", key=f"{key}.{i}")


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1}}`` -> ``{"training.lr": 1}``: the parameter names trackers filter by."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


class Tracker:
    """What the run loop calls; a tracker keeps what it needs to continue in ``state``."""

    name = ""

    def __init__(self, run_dir: Path, config: dict[str, Any], output: Any, state: dict[str, Any]):
        self.run_dir, self.config, self.output, self.state = run_dir, config, output, state

    def log_experience(self, step: int, scalars: dict[str, float], matrix: list[list[float]]) -> None:
        raise NotImplementedError

    def catch_up(self, metrics: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        """Every completed experience this tracker has not received yet (a resume catches up)."""
        from .metrics import step_scalars

        for step in range(self.state.get("logged", -1) + 1, len(steps)):
            self.log_experience(step, step_scalars(step, metrics, steps[step]), metrics["accuracy_matrix"][: step + 1])
            self.state["logged"] = step

    def finish(self, status: str, files: list[Path]) -> None:
        """The run ended (complete, stopped or failed): its files, and the tracker closed."""


class CSVTracker(Tracker):
    """``metrics.csv``: one row per experience, a column per scalar; rewritten whole (atomically)
    from the run's records each time, so a resumed run's file has each experience once."""

    name = "csv"

    def catch_up(self, metrics: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        from .metrics import step_scalars

        rows = [step_scalars(step, metrics, info) for step, info in enumerate(steps)]
        columns = sorted({tag for row in rows for tag in row})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, ["experience", *columns], lineterminator="\n")
        writer.writeheader()
        for experience, row in enumerate(rows):
            writer.writerow({"experience": experience, **row})
        write_text_atomic(self.run_dir / "metrics.csv", buffer.getvalue())
        self.state["logged"] = len(steps) - 1


class WandbTracker(Tracker):
    """A W&B run: the config, scalars with ``step`` the experience, the accuracy matrix as a table,
    the files as one artifact. Project ``output.project``, group ``output.group``; the mode and
    entity come from W&B's own settings (``WANDB_MODE=offline``, ``WANDB_ENTITY``)."""

    name = "wandb"

    def __init__(self, *args: Any):
        super().__init__(*args)
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=self.output.project, group=self.output.group, name=self.run_dir.name,
                              dir=str(self.run_dir), config=self.config, id=self.state.get("id"), resume="allow",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.state["id"] = self.run.id

    def log_experience(self, step: int, scalars: dict[str, float], matrix: list[list[float]]) -> None:
        width = len(matrix[-1])
        table = self.wandb.Table(columns=[f"exp_{j:02d}" for j in range(width)],
                                 data=[row + [None] * (width - len(row)) for row in matrix])
        self.run.log({**scalars, "cil/accuracy_matrix": table}, step=step)

    def finish(self, status: str, files: list[Path]) -> None:
        artifact = self.wandb.Artifact(f"run-{self.run.id}", type="incremental-run",
                                       metadata={"status": status})
        for file in files:
            artifact.add_file(str(file))
        self.run.log_artifact(artifact)
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status == "complete" else 1)


class MLflowTracker(Tracker):
    """An MLflow run in experiment ``output.project`` (tracking URI: MLflow's own setting,
    ``MLFLOW_TRACKING_URI``): the flattened config as parameters, scalars with ``step`` the
    experience, ``accuracy_matrix.json``, the files as artifacts; under a parent run named
    ``output.group`` when set."""

    name = "mlflow"

    def __init__(self, *args: Any):
        super().__init__(*args)
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient()
        experiment_id = mlflow_experiment(client, self.output.project)
        if self.state.get("run_id"):
            self.run_id = self.state["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"mlflow.runName": self.run_dir.name, "incremental.run_dir": str(self.run_dir)}
        if self.output.group:
            tags["mlflow.parentRunId"] = mlflow_parent_run(client, experiment_id, self.output.group)
        self.run_id = client.create_run(experiment_id, tags=tags).info.run_id
        self.state["run_id"] = self.run_id
        params = flat_config(self.config)
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            client.log_batch(self.run_id, params=items[start:start + 100])
        client.log_dict(self.run_id, self.config, "config.json")

    def log_experience(self, step: int, scalars: dict[str, float], matrix: list[list[float]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow keys allow letters, digits and _-./ and spaces: the tags already are
        metrics = [Metric(tag, value, now, step) for tag, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        self.client.log_dict(self.run_id, {"accuracy_matrix": matrix}, "accuracy_matrix.json")

    def finish(self, status: str, files: list[Path]) -> None:
        for file in files:
            self.client.log_artifact(self.run_id, str(file))
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "complete" else
                                   ("KILLED" if status == "stopped" else "FAILED"))


def mlflow_experiment(client: Any, project: str) -> str:
    """The id of MLflow experiment ``project``, created if need be."""
    experiment = client.get_experiment_by_name(project)
    return experiment.experiment_id if experiment else client.create_experiment(project)


def mlflow_parent_run(client: Any, experiment_id: str, group: str) -> str:
    """The sweep's parent run: the first one tagged with ``group``, or a new one."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`incremental.sweep` = '{group}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, tags={"mlflow.runName": group, "incremental.sweep": group}).info.run_id


def prepare_group(cfg: Any) -> None:
    """Before a sweep's runs start (side by side, or as jobs): its MLflow parent run, so that
    concurrent runs find one parent rather than each creating its own."""
    if "mlflow" not in cfg.output.loggers or not cfg.output.group:
        return
    require_tracker_libraries(list(cfg.output.loggers))
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        mlflow_parent_run(client, mlflow_experiment(client, cfg.output.project), cfg.output.group)
    except Exception as exc:  # the library's own errors, as a run would meet them
        raise ConfigError(f"mlflow could not start: {first_line(exc, type(exc).__name__)[:300]}",
                          key=f"output.loggers.{list(cfg.output.loggers).index('mlflow')}") from None


TRACKERS = {"csv": CSVTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}


def start_tracker(name: str, index: int, run_dir: Path, config: dict[str, Any], output: Any,
                  state: dict[str, Any]) -> Tracker:
    """Tracker ``name``, or one line saying why its library would not start (no tracking server,
    a backend the installed client lacks, W&B without a login when online)."""
    try:
        return TRACKERS[name](run_dir, config, output, state)
    except Exception as exc:  # the libraries' own error types (MlflowException, wandb.Error, ...)
        raise ConfigError(f"{name} could not start: {first_line(exc, type(exc).__name__)[:300]}",
                          key=f"output.loggers.{index}") from None


class Trackers:
    """The run's trackers: opened once per process, each sent every experience it has not yet
    received (from the run's records), their state kept in ``trackers.json``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], output: Any):
        import json

        require_tracker_libraries(list(output.loggers))
        self.run_dir = run_dir
        state_file = run_dir / STATE_FILE
        self.state: dict[str, dict[str, Any]] = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.trackers = [start_tracker(name, index, run_dir, config, output, self.state.setdefault(name, {}))
                         for index, name in enumerate(output.loggers) if name in TRACKERS]
        self.save()

    def save(self) -> None:
        write_json_atomic(self.run_dir / STATE_FILE, self.state)

    def log(self, metrics: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        """Every completed experience a tracker has not received (a resume catches up here)."""
        for tracker in self.trackers:
            tracker.catch_up(metrics, steps)
        self.save()

    def finish(self, status: str) -> None:
        files = [self.run_dir / name for name in ARTIFACT_FILES if (self.run_dir / name).is_file()]
        for tracker in self.trackers:
            tracker.finish(status, files)
        self.save()
