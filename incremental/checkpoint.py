"""Per-experience checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds plain data only (tensors, numbers, strings, lists, dicts): no pickled
objects, so loading one never runs code (Avalanche's dill checkpoints do, and fail with torch
2.14 anyway). It is written to a temporary file, flushed to disk and renamed over the
previous one, so a run killed at any moment leaves either the old or the new checkpoint.

Contents (``FORMAT`` 1):

- ``experience``: the last completed experience; ``config``: the resolved config (YAML text);
- ``model``: the state dict, ``num_classes`` (the head's width);
- ``optimizer``: the optimizer's state dict at the end of that experience, ``scheduler``: the
  LR schedule's position. Kept for inspection: every experience starts a fresh optimizer and
  schedule (Avalanche would otherwise carry AdamW moments across experiences), so resuming at
  an experience boundary does not load them;
- ``clock``: Avalanche's training counters (EWC and DER key their state on them);
- ``plugins``: each strategy and compression plugin's ``state_dict()``: the exemplar memory as
  dataset indices, DER's stored logits, EWC's Fisher terms; teachers are not stored, being
  copies of ``model`` at the end of the experience, rebuilt from it on load;
- ``rng``: torch (CPU and every CUDA device), numpy and Python random states;
- ``results``: the accuracy matrix and per-step records, as the JSON metrics.json is built from.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

FORMAT = 1
KIND = "incremental-vit checkpoint"


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, as tensors and numbers. CUDA's only once CUDA
    is in use: reading them would start it (a context on every GPU) for a CPU run, and until
    then they still hold their seed, which a resumed run sets again."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# --------------------------------------------------------------------------- files


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically and durably: a kill leaves the previous checkpoint or this
    one, whole; a failed write (a full disk) leaves the previous one and no temporary file."""
    from .files import write_atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a Python file: a full disk is an OSError, not torch's RuntimeError
            torch.save({"format": FORMAT, "kind": KIND, **state}, handle)

    write_atomic(path, write, durable=True)


def load_checkpoint(path: Path, *, key: str = "--resume") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any problem is a one-line UserError."""
    from .files import load_weights_only

    state = load_weights_only(path, key=key)
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise UserError(f"{path} is not a checkpoint written by `incremental run`", key=key)
    if state.get("format") != FORMAT:
        raise UserError(f"{path} has checkpoint format {state.get('format')!r}; this version reads {FORMAT}",
                        key=key)
    validate_checkpoint(state, path)
    return state


# --------------------------------------------------------------------------- validation


class CheckpointError(UserError):
    """A checkpoint field that is missing or malformed: ``FILE: field: problem``."""

    def __init__(self, path: Path, field: str, problem: str):
        super().__init__(f"{problem}; the checkpoint is damaged, resume from a copy or start the run again",
                         key=field, source=str(path))


def _require(state: Any, field: str, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    """``state[field]`` (a dotted path), or a CheckpointError saying what was expected."""
    node = state
    parts = field.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[: depth + (1 if isinstance(node, dict) else 0)])
            raise CheckpointError(path, where, "is missing" if isinstance(node, dict) else "expected a mapping")
        node = node[part]
    if not isinstance(node, kind) or (isinstance(node, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise CheckpointError(path, field, f"expected {what}, found {type(node).__name__}")
    return node


def validate_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Every field a resume reads, checked for presence and type before anything is restored,
    so a damaged checkpoint is one line naming the field, never a traceback mid-restore."""
    import json

    experience = _require(state, "experience", int, path, "an integer")
    total = _require(state, "num_experiences", int, path, "an integer")
    if not 0 <= experience < total:
        raise CheckpointError(path, "experience", f"is {experience}, outside 0..{total - 1}")
    _require(state, "config", str, path, "the config as YAML text")
    model = _require(state, "model", dict, path, "a state dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise CheckpointError(path, "model", "expected a state dict of tensors")
    if _require(state, "num_classes", int, path, "an integer") < 1:
        raise CheckpointError(path, "num_classes", "must be at least 1")
    for name in CLOCK_FIELDS:
        _require(state, f"clock.{name}", int, path, "an integer")
    _require(state, "grad_scaler", dict, path, "a GradScaler state")
    plugins = _require(state, "plugins", list, path, "a list of plugin states")
    for i, entry in enumerate(plugins):
        if entry is not None and not isinstance(entry, dict):
            raise CheckpointError(path, f"plugins.{i}", f"expected a state dict or null, found {type(entry).__name__}")
    _require(state, "rng.torch", torch.Tensor, path, "a tensor")
    _require(state, "rng.cuda", list, path, "a list of tensors")
    _require(state, "rng.numpy.kind", str, path, "a string")
    keys = _require(state, "rng.numpy.keys", torch.Tensor, path, "a tensor")
    if keys.numel() != 624:
        raise CheckpointError(path, "rng.numpy.keys", f"expected 624 values, found {keys.numel()}")
    _require(state, "rng.numpy.position", int, path, "an integer")
    _require(state, "rng.numpy.has_gauss", int, path, "an integer")
    _require(state, "rng.numpy.cached_gauss", float, path, "a number")
    _require(state, "rng.python.version", int, path, "an integer")
    internal = _require(state, "rng.python.internal", list, path, "a list of integers")
    if len(internal) != 625 or not all(isinstance(v, int) for v in internal):
        raise CheckpointError(path, "rng.python.internal", "expected 625 integers")
    gauss = _require(state, "rng.python", dict, path, "a mapping").get("gauss", "missing")
    if gauss is not None and not isinstance(gauss, float):
        raise CheckpointError(path, "rng.python.gauss", "expected a number or null")
    text = _require(state, "results", str, path, "the results as JSON text")
    try:
        results = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(path, "results", f"is not JSON ({exc})") from None
    if not (isinstance(results, dict) and isinstance(results.get("matrix"), list)
            and isinstance(results.get("steps"), list)):
        raise CheckpointError(path, "results", "expected a mapping with the lists 'matrix' and 'steps'")
    if not len(results["matrix"]) == len(results["steps"]) == experience + 1:
        raise CheckpointError(path, "results", f"holds {len(results['matrix'])} rows of results for "
                              f"experience {experience}")
    if not all(isinstance(row, list) and len(row) == i + 1 and all(isinstance(v, (int, float)) for v in row)
               for i, row in enumerate(results["matrix"])):
        raise CheckpointError(path, "results", "the accuracy matrix is not lower-triangular rows of numbers")
    if not all(isinstance(step, dict) for step in results["steps"]):
        raise CheckpointError(path, "results", "expected one mapping per step")


# --------------------------------------------------------------------------- plugin state


def plugin_states(plugins: list[Any]) -> list[dict[str, Any] | None]:
    """Each plugin's ``state_dict()``, or None for one that has none (it cannot be resumed)."""
    return [p.state_dict() if callable(getattr(p, "state_dict", None)) else None for p in plugins]


def unresumable(plugins: list[Any]) -> list[str]:
    """Class names of the plugins whose state a checkpoint cannot hold."""
    return [type(p).__name__ for p in plugins
            if not (callable(getattr(p, "state_dict", None)) and callable(getattr(p, "load_state_dict", None)))]


CLOCK_FIELDS = ("train_iterations", "train_exp_counter", "train_exp_epochs", "train_exp_iterations",
                "train_epoch_iterations", "total_iterations")


def clock_state(clock: Any) -> dict[str, int]:
    return {name: int(getattr(clock, name)) for name in CLOCK_FIELDS}


def set_clock_state(clock: Any, state: dict[str, int]) -> None:
    for name in CLOCK_FIELDS:
        setattr(clock, name, int(state[name]))
