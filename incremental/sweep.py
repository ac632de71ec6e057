"""``incremental sweep CONFIG --seeds 0 1 2 [--set key=v1,v2 ...]``: a config over seeds and
value grids, one run directory per combination, runs already complete skipped and stopped ones
resumed from their checkpoints.

A ``--set`` whose value lists several values separated by top-level commas
(``strategy=replay,finetune``; commas inside ``[...]`` or ``{...}`` do not split) is a grid
axis; the runs are the product of every axis and the seeds. All the combinations are
validated before the first run starts, and every existing run directory checked: one is
reused only when its resolved config equals the requested one, and none is ever deleted. Run
directories are named after the axis values and the seed, under ``--out`` (default:
``OUTPUT_ROOT/NAME-sweep``).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError


def split_values(text: str) -> list[str]:
    """``a,b`` -> [a, b]; commas inside brackets, braces or quotes stay."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [p.strip() for p in parts]


def grid(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Fixed overrides, and (key, values) axes for those listing several values."""
    fixed, axes = [], []
    for override in overrides:
        if "=" not in override:
            raise UserError(f"expected KEY.PATH=VALUE[,VALUE...], got {override!r}", key="--set")
        key, value = override.split("=", 1)
        values = split_values(value)
        if len(values) > 1:
            axes.append((key.strip(), values))
        else:
            fixed.append(override)
    return fixed, axes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_")[:40] or "x"


def plan(config: str, seeds: Sequence[int], overrides: Sequence[str], out: Path | None,
         plugins: Sequence[str] = ()) -> tuple[Path, list[tuple[Path, Any, Any]]]:
    """The sweep root and (run directory, config, source) of every run, all validated."""
    from .config import load_config

    fixed, axes = grid(overrides)
    runs = []
    root = out
    for values in itertools.product(*(v for _, v in axes)) if axes else [()]:
        for seed in seeds:
            assignment = [f"{key}={value}" for (key, _), value in zip(axes, values)]
            cfg, source = load_config(config, [*fixed, *assignment, f"seed={seed}"], plugins=plugins)
            if root is None:
                root = Path(cfg.output.root) / f"{cfg.name}-sweep"
            parts = [_slug(f"{key.rsplit('.', 1)[-1]}={value}") for (key, _), value in zip(axes, values)]
            runs.append((root / "-".join([*parts, f"seed{seed}"]), cfg, source))
    if root is None:
        raise UserError("no seeds given", key="--seeds")
    return root, runs


def sweep(config: str, seeds: Sequence[int], overrides: Sequence[str] = (), out: Path | None = None, *,
          quiet: bool = False, echo: Callable[[str], None] = print, plugins: Sequence[str] = ()) -> list[Path]:
    """Run every combination not yet complete; returns the run directories in order.

    An existing directory is reused only when its resolved config equals the one asked for:
    kept when complete, resumed when stopped or failed. Any other directory (another config,
    one in use, files that are not a run) is refused before the first run starts, and no
    directory is ever deleted."""
    from .errors import Interrupted
    from .run import run
    from .run.directory import reuse_decision

    root, runs = plan(config, seeds, overrides, out, plugins)
    decisions = [reuse_decision(run_dir, cfg) for run_dir, cfg, _ in runs]
    echo(f"sweep: {len(runs)} runs under {root}")
    refused = [(run_dir, reason) for (run_dir, _, _), (kind, reason) in zip(runs, decisions) if kind == "refused"]
    for index, ((run_dir, _, _), (kind, reason)) in enumerate(zip(runs, decisions), 1):
        if kind != "new":
            echo(f"[{index}/{len(runs)}] {kind} {run_dir} ({reason})")
    if refused:
        first, reason = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UserError(f"{first} {reason}{more}; the sweep touches no directory it cannot reuse: remove it or "
                        f"choose another --out", key="--out")
    for index, ((run_dir, cfg, source), (kind, _)) in enumerate(zip(runs, decisions), 1):
        if kind == "kept":
            continue
        echo(f"[{index}/{len(runs)}] {'resuming' if kind == 'resume' else 'running'} {run_dir}")
        try:
            metrics = run(cfg, run_dir, quiet=True, resume=kind == "resume")
        except Interrupted as exc:
            raise Interrupted(f"{exc.message.split(';')[0]}; complete runs are kept, and the stopped one resumes "
                              f"when the sweep is started again", exit_code=exc.exit_code) from None
        except UserError as exc:
            raise source.attribute(exc)
        if not quiet:
            echo(f"    average incremental accuracy {metrics['average_incremental_accuracy']:.2f}, "
                 f"last {metrics['last_accuracy']:.2f}")
    return [run_dir for run_dir, _, _ in runs]
