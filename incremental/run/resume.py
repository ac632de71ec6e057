"""Continuing a stopped run: its checkpoint's state restored into a freshly built run, and the
state an experience leaves written into one. Where a resume starts is the run directory's
decision (:func:`incremental.run.directory.plan_resume`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import RunConfig, dump_yaml
from ..errors import ConfigError, UserError, first_line
from .directory import CHECKPOINT_FILE
from .results import RunResults


def restore_checkpoint(checkpoint: dict[str, Any], *, model: Any, plugins: list[Any], template: Any,
                       results: RunResults, run_dir: Path) -> int:
    """Load a (validated) checkpoint into a freshly built run; returns the first experience
    still to train. A plugin that cannot take its saved state is one line naming it."""
    from ..checkpoint import set_clock_state
    from ..models.net import load_trained_state

    path = run_dir / CHECKPOINT_FILE
    states = checkpoint["plugins"]
    complete = int(checkpoint["experience"]) + 1 >= int(checkpoint["num_experiences"])
    if not complete and (len(states) != len(plugins) or any(state is None for state in states)):
        names = [type(p).__name__ for p, state in zip(plugins, states) if state is None] or ["a different plugin list"]
        raise ConfigError(f"this strategy keeps state that a checkpoint cannot hold ({', '.join(names)}); "
                          f"the run cannot be resumed, start it again", key="strategy.name")
    try:
        load_trained_state(model, checkpoint["model"], int(checkpoint["num_classes"]))
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise UserError(f"{path} does not fit the model of config.yaml: "
                        f"{lines[1].strip() if len(lines) > 1 else lines[0]}", key="backbone") from None
    for index, (plugin, state) in enumerate(zip(plugins, states)):
        if state is None:
            continue
        try:
            plugin.load_state_dict(state, model)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            detail = first_line(exc)[:160]
            raise UserError(f"{type(plugin).__name__} cannot load this state ({type(exc).__name__}"
                            f"{': ' + detail if detail else ''}); the checkpoint is damaged",
                            key=f"plugins.{index}", source=str(path)) from None
    set_clock_state(template.clock, checkpoint["clock"])
    if checkpoint["grad_scaler"]:
        try:
            template.scaler.load_state_dict(checkpoint["grad_scaler"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"is not a GradScaler state ({type(exc).__name__})", key="grad_scaler",
                            source=str(path)) from None
    saved = json.loads(checkpoint["results"])
    results.matrix, results.steps = saved["matrix"], saved["steps"]
    try:
        from ..checkpoint import set_rng_state

        set_rng_state(checkpoint["rng"])  # last: building the run above drew random numbers
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot be restored ({type(exc).__name__}: {str(exc)[:120]})", key="rng",
                        source=str(path)) from None
    return int(checkpoint["experience"]) + 1


def checkpoint_state(cfg: RunConfig, experience: int, *, template: Any, plugins: list[Any],
                     schedule: dict[str, Any], results: RunResults) -> dict[str, Any]:
    """Everything a resume after ``experience`` needs, as plain data (see incremental.checkpoint)."""
    from ..checkpoint import clock_state, plugin_states, rng_state

    return {
        "experience": experience,
        "num_experiences": len(results.experiences),
        "config": dump_yaml(cfg),
        "model": {k: v.detach().cpu() for k, v in template.model.state_dict().items()},
        "num_classes": int(template.model.num_classes),
        "optimizer": template.optimizer.state_dict(),
        "scheduler": schedule,
        "clock": clock_state(template.clock),
        "grad_scaler": template.scaler.state_dict(),  # fp16 loss scale, carried across experiences
        "plugins": plugin_states(plugins),
        "rng": rng_state(),
        "results": json.dumps({"matrix": results.matrix, "steps": results.steps}),
    }
