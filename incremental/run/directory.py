"""One owner for a run directory: what it holds, the order it is written in, who holds it,
the state it is in, and how a stopped run continues.

Files, in the order experience ``k`` writes them::

    config.yaml          the resolved config, written once when the run is created
    run.lock             held (flock) by the process running it: PID, host and start time
    events.out.tfevents  TensorBoard, step k (flushed)  } a resume purges the steps it redoes
    checkpoint.pt        state after k, durable         } the experience is complete from here on
    checkpoints/experience_KKK.pt (output.checkpoint: all)
    model.safetensors    the model after k
    metrics.json         results; claims k complete only once the checkpoint above is durable
    resume.log           one line per resume
    probes.json          `incremental probe`

States (``metrics.json``'s ``status``, read together with the lock)::

    created -> running(k) -> complete | failed(k) | stopped(k)

A process that dies without a word (SIGKILL, a lost node) leaves ``status: running`` and
releases the lock; every reader then reports ``stopped``. A directory with a config can
always be continued by ``incremental run --resume DIR``: from its checkpoint, or from
experience 0 in place when none of its experiences is complete.

Everything that decides about run directories (``run``, ``--resume``, ``sweep``, ``probe``,
``compare`` and the experiment scripts) asks this module.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, UserError
from ..files import (TMP_SUFFIX, WriteError, append_line, remove_temporary_files, write_atomic, write_json_atomic,
                     write_text_atomic)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.safetensors"  # the model after the last completed experience
LOCK_FILE = "run.lock"
RESUME_LOG = "resume.log"
ARCHIVE_DIR = "checkpoints"  # output.checkpoint: all
MODEL_FORMAT = "incremental-vit model"


def default_run_dir(cfg: Any, suffix: str = "") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{cfg.name}{suffix}-{stamp}"


# --------------------------------------------------------------------------- lock


class RunInUse(UserError):
    """Another live process holds the directory's lock."""


def _describe_holder(holder: dict[str, Any]) -> str:
    pid = holder.get("pid")
    where = f" on {holder['host']}" if holder.get("host") and holder.get("host") != socket.gethostname() else ""
    since = f" since {holder['started']}" if holder.get("started") else ""
    return f"process {pid if pid is not None else '(starting)'}{where}{since}"


def _read_holder(lock_path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_holder(folder: Path) -> dict[str, Any] | None:
    """Who holds ``folder``'s lock right now (``{pid, host, started}``), or None.

    The lock is an flock on ``run.lock``: the kernel drops it when its process dies however it
    dies, so a lock left by a killed run is simply free, and PID reuse cannot fool a reader."""
    import fcntl

    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path)
    except OSError:  # a file system without flock: nobody can be seen holding it
        return None
    finally:
        os.close(fd)  # closing drops the shared lock just taken
    return None


class RunLock:
    """The exclusive lock a running process holds on its run directory."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, *, key: str) -> "RunLock":
        import fcntl

        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteError(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUse(f"{folder} is in use by {_describe_holder(_read_holder(path))} ({LOCK_FILE}); "
                           f"wait for it to finish or stop it", key=key) from None
        except OSError:
            pass  # no flock on this file system: run unlocked rather than not at all
        return cls(folder, fd)

    def record_holder(self) -> None:
        """Write this process into the lock file (a dead holder's entry is overwritten)."""
        if self._fd is None:
            return
        entry = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": datetime.now().isoformat(timespec="seconds")}) + "\n"
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, entry.encode(), 0)
        except OSError as exc:
            raise WriteError(self.folder / LOCK_FILE, exc) from None

    def release(self) -> None:
        # The file stays: deleting a lock file while another process opens it lets two
        # processes each lock a different file.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RunState:
    """What a reader sees in a directory: ``status`` is ``absent`` (no such folder),
    ``not_a_run`` (no config.yaml), ``running`` (a live process holds the lock), ``stopped``
    (its process is gone before the end), ``failed`` or ``complete``."""

    path: Path
    status: str
    completed: int = 0
    num_experiences: int | None = None
    holder: dict[str, Any] | None = None

    @property
    def is_run(self) -> bool:
        return self.status not in ("absent", "not_a_run")

    @property
    def label(self) -> str:
        """``complete``, ``running (process 12, exp 1 of 0-4 done)``, ``stopped after exp 1 of 0-4``, ...
        Experiences are numbered from 0, as in metrics.json, the table and TensorBoard."""
        if self.status == "running" and self.holder is not None:
            done = f"exp {self.last_complete} done" if self.completed else "no experience done yet"
            return f"running ({_describe_holder(self.holder)}, {done})"
        if self.status in ("stopped", "failed"):
            if not self.completed:
                return f"{self.status} before exp 0 was complete"
            return f"{self.status} after exp {self.last_complete}"
        return self.status.replace("_", " ")

    @property
    def last_complete(self) -> str:
        """``1 of 0-4``: the last complete experience, and the range of them."""
        last = f"of 0-{self.num_experiences - 1}" if self.num_experiences else "of ?"
        return f"{self.completed - 1} {last}"


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """metrics.json as a mapping, or None when it is missing or unreadable."""
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_state(folder: Path, *, holding_lock: bool = False) -> RunState:
    """The state of ``folder`` as every reader (compare, sweep, the CLI) reports it;
    ``holding_lock``: asked by the process that holds the lock, which is not a live run."""
    if not folder.is_dir():
        return RunState(folder, "absent")
    if not (folder / CONFIG_FILE).is_file():
        return RunState(folder, "not_a_run")
    metrics = read_metrics(folder) or {}
    completed = _count(metrics.get("completed_experiences"))
    total = metrics.get("num_experiences") if isinstance(metrics.get("num_experiences"), int) else None
    holder = None if holding_lock else lock_holder(folder)
    if holder is not None:
        return RunState(folder, "running", completed, total, holder)
    status = metrics.get("status")
    if status in ("complete", "failed"):
        return RunState(folder, status, completed, total)
    return RunState(folder, "stopped", completed, total)  # running, stopped, or never got further


def read_yaml_quietly(path: Path) -> dict[str, Any]:
    """A YAML mapping, or {} when it is missing or unreadable (for messages, not decisions)."""
    from ..config import read_yaml

    try:
        return read_yaml(path)
    except UserError:
        return {}


def is_complete(folder: Path, marker: str = METRICS_FILE) -> bool:
    """Whether ``folder/marker`` (metrics.json, or MAE's mae_log.json) says ``complete``."""
    try:
        return json.loads((folder / marker).read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- resume plan


@dataclass
class ResumePlan:
    """Where a resumed run starts: after the checkpoint's experience, or at 0 in place."""

    start: int
    checkpoint: dict[str, Any] | None


def saved_config(folder: Path, schema: type | None = None) -> Any:
    """The run's own config.yaml, parsed (``schema``: RunConfig by default)."""
    from ..config import RunConfig, parse_dataclass, read_yaml

    path = folder / CONFIG_FILE
    try:
        return parse_dataclass(schema or RunConfig, read_yaml(path))
    except UserError as exc:
        raise exc.with_context(source=str(path))


def plan_resume(folder: Path, cfg: Any) -> ResumePlan:
    """How to continue the run in ``folder`` under ``cfg`` (which must resolve to the same
    values as the run's), checked before anything is built; read-only, so every rank of a
    torchrun job may ask."""
    import yaml

    from ..checkpoint import load_checkpoint
    from ..config import RunConfig, config_differences, parse_dataclass

    path = folder / CHECKPOINT_FILE
    if path.exists():
        checkpoint = load_checkpoint(path)
        try:
            # Parsed, so keys a later version adds take their defaults instead of differing.
            saved = parse_dataclass(RunConfig, yaml.safe_load(checkpoint["config"]))
        except (UserError, yaml.YAMLError) as exc:
            raise UserError(f"holds a config this version cannot read ({exc})", key="config",
                            source=str(path)) from None
        differences = config_differences(saved, cfg)
        if differences:
            key, was, now = differences[0]
            raise ConfigError(f"is {now!r} but {path.name} was written with {was!r}; restore it or start a new run",
                              key=key, source=str(folder / CONFIG_FILE))
        return ResumePlan(int(checkpoint["experience"]) + 1, checkpoint)
    done = _count((read_metrics(folder) or {}).get("completed_experiences"))
    output = read_yaml_quietly(folder / CONFIG_FILE).get("output")
    if done and isinstance(output, dict) and output.get("checkpoint") == "off":
        raise UserError(f"{folder} has results of {done} experience(s) but no {CHECKPOINT_FILE}: the run was "
                        f"made with output.checkpoint: off and cannot be resumed", key="--resume")
    if done:
        raise UserError(f"{folder} has results of {done} experience(s) but its {CHECKPOINT_FILE} is missing; "
                        f"restore it from a copy (or start a new run)", key="--resume")
    return ResumePlan(0, None)


def reuse_decision(folder: Path, cfg: Any) -> tuple[str, str]:
    """What a sweep (or an experiment script) may do with ``folder`` for a run of ``cfg``:
    ``new`` (nothing there), ``kept`` (complete, same config), ``resume`` (stopped or failed,
    same config) or ``refused`` (anything else, never touched); and why."""
    from ..config import config_differences

    state = read_state(folder)
    if state.status == "absent" or (state.status == "not_a_run" and not any(folder.iterdir())):
        return "new", ""
    if state.status == "not_a_run":
        return "refused", f"holds files but no run ({CONFIG_FILE} missing)"
    if state.status == "running":
        return "refused", f"in use by {_describe_holder(state.holder or {})}"
    try:
        saved = saved_config(folder)
    except UserError as exc:
        return "refused", f"its {CONFIG_FILE} cannot be read ({exc})"
    differences = config_differences(saved, cfg)
    if differences:
        key, was, now = differences[0]
        more = f" and {len(differences) - 1} more key(s)" if len(differences) > 1 else ""
        return "refused", f"holds a run of another config ({key}: {was!r} there, {now!r} here{more})"
    if state.status == "complete":
        return "kept", "complete"
    return "resume", state.label


def check_recorded_plugins(folder: Path, named: list[str], trusted: bool) -> list[str]:
    """The plugin files and modules a run's config.yaml lists, refused unless each was named
    again (``--plugin``, or the user's own CONFIG) or ``trusted`` (``--trust-plugins``): a run
    folder that someone shared must not run code on whoever probes or resumes it."""
    from ..config import read_yaml

    path = folder / CONFIG_FILE
    recorded = read_yaml(path).get("plugins") or []
    if not isinstance(recorded, list) or not all(isinstance(p, str) for p in recorded):
        raise ConfigError(f"expected a list of plugin paths, got {str(recorded)[:60]}", key="plugins",
                          source=str(path))
    unnamed = [spec for spec in recorded if spec not in set(named)]
    if unnamed and not trusted:
        raise ConfigError(f"the run was made with plugin code that is not imported from a run folder unless you "
                          f"ask: {', '.join(unnamed)}; name each again with --plugin, or pass --trust-plugins",
                          key="plugins", source=str(path))
    return recorded


# --------------------------------------------------------------------------- the model file


def write_model(model: Any, path: Path, *, experience: int, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as safetensors (no pickle), replaced atomically, with the
    experience it was trained up to, its class count and ``metadata`` (``evaluated_as``) in the
    metadata."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = save(state, metadata={"experience": str(experience), "num_classes": str(model.num_classes),
                                 "format": MODEL_FORMAT, **(metadata or {})})
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def read_model(path: Path, *, key: str = "RUN_DIR") -> tuple[dict[str, Any], int, int]:
    """``(state dict, experience, num_classes)`` of a model file written by :func:`write_model`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path} does not exist; runs save it after each experience unless "
                        f"output.save_model is false", key=key)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
        return state, int(metadata["experience"]), int(metadata["num_classes"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path} is not a model saved by `incremental run` ({exc})", key=key) from None


# --------------------------------------------------------------------------- the writer


class RunDirectory:
    """The directory of one run, held by the process that writes it.

    Made by :meth:`create` (a new run) or :meth:`reopen` (``--resume``); both take the lock,
    which :meth:`close` releases. Every write of the run goes through here, in the order the
    module docstring gives."""

    def __init__(self, path: Path, lock: RunLock):
        self.path = path
        self.lock = lock
        self.completed = 0  # experiences that are durable: checkpointed (or in metrics.json, without checkpoints)
        self.num_experiences: int | None = None
        self.checkpointing = True
        # written into model.safetensors: "evaluated_as: int8_dynamic" when the run evaluates the
        # int8 copy made from these fp32 weights (models.compress.int8_copy)
        self.model_metadata: dict[str, str] = {}
        self.unresumable: list[str] = []  # plugins whose state a checkpoint cannot hold
        self.config_written = False
        self.fresh = False  # a new run (not a resume): its files go if it ends with nothing complete
        self.made_folder = False

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: Path, config_text: str, *, marker: str = METRICS_FILE, key: str = "--out") -> "RunDirectory":
        """A new run in ``path`` (made if missing); refused when it already holds one. ``key``
        names what chose the path (``--out``, or ``output.root``), for errors."""
        made_folder = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write to {path}: {exc.strerror or exc}", key=key) from None
        if not path.is_dir():
            raise UserError(f"{path} is not a folder", key=key)
        lock = RunLock.acquire(path, key=key)
        directory = cls(path, lock)
        directory.fresh, directory.made_folder = True, made_folder
        try:
            if (path / CONFIG_FILE).exists() or (path / marker).exists():
                state = read_state(path, holding_lock=True)
                hint = f"continue it with `incremental run --resume {path}`, or " \
                    if state.status in ("stopped", "failed") and marker == METRICS_FILE else ""
                raise UserError(f"{path} already holds a run ({state.label}); {hint}choose another --out", key=key)
            lock.record_holder()
            write_text_atomic(path / CONFIG_FILE, config_text)
            directory.config_written = True
        except BaseException:
            lock.release()
            raise
        return directory

    @classmethod
    def reopen(cls, path: Path) -> "RunDirectory":
        """An existing run, to continue it (``--resume``)."""
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"{path} has no {CONFIG_FILE}; expected a directory written by `incremental run`",
                            key="--resume")
        directory = cls(path, RunLock.acquire(path, key="--resume"))
        directory.config_written = True
        return directory

    def begin(self) -> None:
        """Claim the directory for this process once the checks have passed: the lock file
        names it, and a kill's leftover temporary files go."""
        self.lock.record_holder()
        remove_temporary_files(self.path)

    def log_resume(self, plan: ResumePlan) -> None:
        """A resume that has restored its state: logged in resume.log. One at experience 0
        starts again in place, so the stopped attempt's results go."""
        self.completed = plan.start
        if plan.start == 0:
            for name in (METRICS_FILE, MODEL_FILE):
                (self.path / name).unlink(missing_ok=True)
        verb = "resumed at" if plan.checkpoint is not None else "restarted from"
        append_line(self.path / RESUME_LOG, f"{datetime.now().isoformat(timespec='seconds')} {verb} "
                                            f"experience {plan.start}")

    def discard(self) -> None:
        """Remove what this new run wrote (it ended before any experience was complete), and
        the folder itself if this run made it and nothing else is in it."""
        for item in self.path.iterdir():
            if item.name in (CONFIG_FILE, METRICS_FILE, MODEL_FILE, LOCK_FILE, CHECKPOINT_FILE) \
                    or item.name.startswith("events.out.tfevents.") or item.name.endswith(TMP_SUFFIX):
                try:
                    item.unlink()
                except OSError:
                    pass
        self.config_written = False
        if self.made_folder:
            try:
                self.path.rmdir()  # only if empty: a user's own files are never removed
            except OSError:
                pass

    def close(self) -> None:
        self.lock.release()

    # ---------------------------------------------------------------- writing an experience
    def reached(self, boundary: str, experience: int) -> None:
        """Called after each write of an experience (``tensorboard``, ``checkpoint``,
        ``model``, ``metrics``): a seam where fault-injection tests stop the process."""

    def record_experience(self, experience: int, metrics: dict[str, Any], *,
                          tensorboard: Callable[[], None] | None = None,
                          checkpoint: Callable[[], dict[str, Any]] | None = None, archive: bool = False,
                          model: Any = None) -> None:
        """Write experience ``experience`` in the durable order: TensorBoard, checkpoint, model,
        then metrics.json, which claims the experience only once all of that is on disk."""
        if tensorboard is not None:
            try:
                tensorboard()
            except OSError as exc:  # tensorboard re-raises its writer thread's error here
                raise WriteError(self.path / "events.out.tfevents", exc) from None
            self.reached("tensorboard", experience)
        if checkpoint is not None:
            from ..checkpoint import save_checkpoint

            path = self.path / CHECKPOINT_FILE
            save_checkpoint(checkpoint(), path)
            if archive:
                import shutil

                folder = self.path / ARCHIVE_DIR
                try:
                    folder.mkdir(exist_ok=True)
                except OSError as exc:
                    raise WriteError(folder, exc) from None
                write_atomic(folder / f"experience_{experience:03d}.pt",
                             lambda tmp: shutil.copyfile(path, tmp), durable=True)
            self.completed = experience + 1  # durable: a resume continues after it
            self.reached("checkpoint", experience)
        if model is not None:
            write_model(model, self.path / MODEL_FILE, experience=experience, metadata=self.model_metadata)
            self.reached("model", experience)
        write_json_atomic(self.path / METRICS_FILE, metrics)
        self.completed = experience + 1
        self.reached("metrics", experience)

    def record_metrics(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.path / METRICS_FILE, metrics)

    def record_stop(self, metrics: dict[str, Any] | None) -> None:
        """After a failure or an interrupt: metrics.json says so, with the experiences that
        are durable. If even that cannot be written (a full disk) the last complete state
        stays, which readers report as stopped. Temporary files are removed either way."""
        if metrics is not None:
            try:
                write_json_atomic(self.path / METRICS_FILE, metrics)
            except WriteError:
                pass
        remove_temporary_files(self.path)

    def resume_hint(self) -> str:
        """``; continue with `incremental run --resume DIR``` when, and only when, that would
        work: the config is there, the run is not complete, and the completed experiences
        (if any) have a checkpoint whose plugin states can be restored."""
        if not self.config_written or (self.num_experiences is not None and self.completed >= self.num_experiences):
            return ""
        if self.completed and (not self.checkpointing or self.unresumable):
            return ""
        verb = "continue with" if self.completed else "start it again with"
        return f"; {verb} `incremental run --resume {self.path}`"
