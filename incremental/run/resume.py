"""Resuming a stopped run from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import RunConfig, dump_yaml
from ..errors import ConfigError, UserError
from .results import RunResults


def can_resume(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds a stopped run of ``cfg`` with a checkpoint to continue from."""
    import yaml

    from ..checkpoint import CHECKPOINT_FILE
    from ..config import config_differences, parse_dataclass

    try:
        saved = parse_dataclass(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, UserError):
        return False
    return (run_dir / CHECKPOINT_FILE).is_file() and not config_differences(saved, cfg)


def open_resume(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The checkpoint to resume ``run_dir`` from, checked against ``cfg``; None when the run
    stopped before its first experience was complete (it then starts again in place)."""
    import yaml

    from ..checkpoint import CHECKPOINT_FILE, load_checkpoint
    from ..config import config_differences, parse_dataclass

    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        metrics = run_dir / "metrics.json"
        done = 0
        if metrics.exists():
            try:
                done = int(json.loads(metrics.read_text()).get("completed_experiences", 0))
            except (ValueError, AttributeError, TypeError):
                done = 0
        if done:
            raise UserError(f"{run_dir} has results of {done} experience(s) but no {CHECKPOINT_FILE} "
                            f"(output.checkpoint was off); it cannot be resumed", key="--resume")
        return None
    checkpoint = load_checkpoint(path)
    try:
        # Parsed, so keys a later version adds take their defaults instead of differing.
        saved = parse_dataclass(RunConfig, yaml.safe_load(checkpoint["config"]))
    except (UserError, yaml.YAMLError) as exc:
        raise UserError(f"{path} holds a config this version cannot read ({exc})", key="--resume") from None
    differences = config_differences(saved, cfg)
    if differences:
        key, was, now = differences[0]
        raise ConfigError(f"is {now!r} but {path.name} was written with {was!r}; restore it or start a new run",
                          key=key, source=str(run_dir / "config.yaml"))
    return checkpoint


def restore_checkpoint(checkpoint: dict[str, Any], *, model: Any, plugins: list[Any], template: Any,
                       results: RunResults, run_dir: Path) -> int:
    """Load a checkpoint into a freshly built run; returns the first experience still to train."""
    from ..checkpoint import set_clock_state, set_rng_state
    from ..models.net import grow_head

    states = checkpoint["plugins"]
    complete = int(checkpoint["experience"]) + 1 >= int(checkpoint["num_experiences"])
    if not complete and (len(states) != len(plugins) or any(state is None for state in states)):
        names = [type(p).__name__ for p, state in zip(plugins, states) if state is None] or ["a different plugin list"]
        raise ConfigError(f"this strategy keeps state that a checkpoint cannot hold ({', '.join(names)}); "
                          f"the run cannot be resumed, start it again", key="strategy.name")
    grow_head(model, int(checkpoint["num_classes"]))
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise UserError(f"{run_dir / 'checkpoint.pt'} does not fit the model of config.yaml: "
                        f"{lines[1].strip() if len(lines) > 1 else lines[0]}", key="backbone") from None
    for plugin, state in zip(plugins, states):
        if state is not None:
            plugin.load_state_dict(state, model)
    set_clock_state(template.clock, checkpoint["clock"])
    if checkpoint["grad_scaler"]:
        template.scaler.load_state_dict(checkpoint["grad_scaler"])
    saved = json.loads(checkpoint["results"])
    if not len(saved["matrix"]) == len(saved["steps"]) == int(checkpoint["experience"]) + 1:
        raise UserError(f"{run_dir / 'checkpoint.pt'} is inconsistent: experience {checkpoint['experience']} "
                        f"with {len(saved['matrix'])} rows of results", key="--resume")
    results.matrix, results.steps = saved["matrix"], saved["steps"]
    set_rng_state(checkpoint["rng"])  # last: building the run above drew random numbers
    return int(checkpoint["experience"]) + 1


def write_checkpoint(run_dir: Path, cfg: RunConfig, experience: int, *, template: Any, plugins: list[Any],
                     schedule: dict[str, Any], results: RunResults) -> None:
    from ..checkpoint import CHECKPOINT_FILE, clock_state, plugin_states, rng_state, save_checkpoint

    state = {
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
    path = run_dir / CHECKPOINT_FILE
    save_checkpoint(state, path)
    if cfg.output.checkpoint == "all":
        archive = run_dir / "checkpoints"
        archive.mkdir(exist_ok=True)
        target = archive / f"experience_{experience:03d}.pt"
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
