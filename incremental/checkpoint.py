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

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"
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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically: a kill leaves the previous checkpoint or this one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save({"format": FORMAT, "kind": KIND, **state}, handle)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_checkpoint(path: Path, *, key: str = "--resume") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any problem is a one-line UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", key=key) from None
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers; its message is long
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} holds objects a checkpoint may not hold, refused by torch.load(weights_only=True) "
                        f"({first[:160]})", key=key) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'truncated'})",
                        key=key) from None
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise UserError(f"{path} is not a checkpoint written by `incremental run`", key=key)
    if state.get("format") != FORMAT:
        raise UserError(f"{path} has checkpoint format {state.get('format')!r}; this version reads {FORMAT}",
                        key=key)
    return state


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
