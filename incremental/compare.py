"""``incremental compare RUN_DIR...``: one table (and report.md with plots) over runs.

Runs whose resolved configs differ only in the seed (``seed``, ``protocol.order_seed``) and
in bookkeeping (``name``, ``description``, ``output``) form one group, reported as mean ±
standard deviation over its runs; ``--group-by KEY`` groups by the value of config keys
instead. A group is labelled by the config values that tell it apart from the others.
"""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import UserError

# Config keys that do not make a different method: seeds, bookkeeping and the (read-only) probes.
IGNORED_KEYS = ("seed", "protocol.order_seed", "name", "description", "probes")
IGNORED_PREFIXES = ("output.",)

# (column, how to read it from metrics.json) for the summary table
SUMMARY_COLUMNS: list[tuple[str, Any]] = [
    ("avg inc acc", lambda m: m.get("average_incremental_accuracy")),
    ("last acc", lambda m: m.get("last_accuracy")),
    ("forgetting", lambda m: (m.get("forgetting") or {}).get("mean")),
    ("bwt", lambda m: (m.get("bwt") or {}).get("final")),
]
# Shown when a run has them (runs recorded before these existed have not)
TASK_COLUMNS: list[tuple[str, Any]] = [
    ("last task-IL acc", lambda m: (m.get("task_il_accuracy") or [None])[-1]),
    ("last task id", lambda m: (m.get("task_identification") or [None])[-1]),
]
# Probe summaries shown when present: (label, summary key, column), at the last probed step.
PROBE_COLUMNS = [
    ("corruptions", "mean_accuracy", "corrupted acc"),
    ("corruptions", "mce", "mCE"),
    ("masking", "cutout/0.2", "CutOut 20%"),
    ("adversarial", "linf/0.007843", "PGD L-inf 2/255"),
    ("ood", "auroc/max_logit", "OOD AUROC"),
]


@dataclass
class Run:
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]

    @property
    def flat_config(self) -> dict[str, Any]:
        return flatten(self.config)


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values; lists stay values (a class order, a probe list)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def load_run(path: Path) -> Run:
    """A run directory's metrics.json and config.yaml; a one-line error when either is unusable.
    A run that stopped before its first experience has no metrics.json: it loads with none."""
    from .run.directory import CONFIG_FILE, METRICS_FILE

    if not path.is_dir():
        raise UserError(f"{path} is not a run directory", key="RUN_DIR")
    from .config.files import load_yaml_text

    try:
        config = load_yaml_text((path / CONFIG_FILE).read_text())
        metrics = json.loads((path / METRICS_FILE).read_text()) if (path / METRICS_FILE).exists() else {}
    except FileNotFoundError as exc:
        raise UserError(f"{path} has no {Path(exc.filename).name}; is it a run directory?", key="RUN_DIR") from None
    except (OSError, ValueError, yaml.YAMLError, UserError) as exc:
        raise UserError(f"{path}: unreadable run files ({type(exc).__name__})", key="RUN_DIR") from None
    if not isinstance(metrics, dict) or (metrics and "accuracy_matrix" not in metrics) or not isinstance(config, dict):
        raise UserError(f"{path}: metrics.json or config.yaml is not a run's", key="RUN_DIR")
    if metrics:
        check_metrics(metrics, path / METRICS_FILE)
    return Run(path, metrics, config)


def expand_run_paths(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Run directories from what the user named: a run directory as it is, a folder of runs
    (``incremental sweep``'s) as its run directories; folders that hold no run (a sweep's
    ``comparison/``) are skipped with a note, or refused when nothing else was named."""
    from .run.directory import CONFIG_FILE

    runs: list[Path] = []
    skipped: list[Path] = []
    for path in paths:
        if not path.is_dir() or (path / CONFIG_FILE).is_file():
            runs.append(path)  # load_run reports what is wrong with a path that is not a folder
            continue
        inside = sorted(child for child in path.iterdir() if child.is_dir())
        found = [child for child in inside if (child / CONFIG_FILE).is_file()]
        runs += found
        skipped += [child for child in inside if child not in found] if found else [path]
    if not runs:
        named = skipped[0] if len(skipped) == 1 else f"{len(skipped)} folders"
        raise UserError(f"{named} holds no run directory (no {CONFIG_FILE}); name runs or a sweep's folder",
                        key="RUN_DIR")
    notes = [f"skipped {path}: not a run directory (no {CONFIG_FILE})" for path in skipped]
    return runs, notes


def plural(count: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _numbers(value: Any, *, allow_none: bool = True) -> bool:
    return isinstance(value, list) and all((v is None and allow_none) or
                                           (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)


def check_metrics(metrics: dict[str, Any], file: Path) -> None:
    """The metrics.json fields compare reads, checked for shape: a hand-edited or foreign file
    is one line naming the field, not a traceback halfway through the table."""
    def number(value: Any) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    matrix = metrics.get("accuracy_matrix")
    if not (isinstance(matrix, list) and all(_numbers(row, allow_none=False) and len(row) == i + 1
                                             for i, row in enumerate(matrix))):
        raise UserError("expected lower-triangular rows of accuracies", key="accuracy_matrix", source=str(file))
    if not _numbers(metrics.get("accuracy", [])):
        raise UserError("expected a list of accuracies", key="accuracy", source=str(file))
    for key in ("average_incremental_accuracy", "last_accuracy"):
        if not number(metrics.get(key)):
            raise UserError("expected a number", key=key, source=str(file))
    for key, inner in (("forgetting", "per_step"), ("bwt", "per_step")):
        section = metrics.get(key, {})
        if not (isinstance(section, dict) and _numbers(section.get(inner, [])) and
                all(number(section.get(k)) for k in ("mean", "final"))):
            raise UserError(f"expected a mapping with a list {inner!r} of numbers", key=key, source=str(file))
    probes = metrics.get("probes", {})
    if not (isinstance(probes, dict) and all(isinstance(v, list) and all(r is None or isinstance(r, dict) for r in v)
                                             for v in probes.values())):
        raise UserError("expected {label: [result or null per experience]}", key="probes", source=str(file))


def _method_key(run: Run) -> tuple[tuple[str, str], ...]:
    items = {k: v for k, v in run.flat_config.items()
             if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in items.items()))


# keys that name, file or probe a run without changing what it computes (probes restore every RNG)
NOT_THE_EXPERIMENT = ("name", "description", "probes", "output.")


def without_repeats(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """The runs with each experiment once (the same resolved config and seed, whatever the run's
    name or output settings: the same numbers), and a note naming each repeat left out. Without
    this, one run under two names (a sweep's directory and a copy) counts twice in a mean ± std."""
    kept: dict[str, Run] = {}
    notes = []
    for run in runs:
        experiment = json.dumps({k: v for k, v in run.flat_config.items() if not k.startswith(NOT_THE_EXPERIMENT)},
                                sort_keys=True, default=str)
        if experiment in kept:
            notes.append(f"counted once: {run.path} repeats {kept[experiment].path} (the same config and seed)")
        else:
            kept[experiment] = run
    return list(kept.values()), notes


def group_runs(runs: Sequence[Run], group_by: Sequence[str] = ()) -> list[Group]:
    """Groups in first-seen order, labelled by the keys whose values differ between groups."""
    if group_by:
        for key in group_by:
            if not any(key in run.flat_config for run in runs):
                from .errors import did_you_mean

                keys = sorted({k for run in runs for k in run.flat_config})
                raise UserError(f"no run has config key {key!r}{did_you_mean(key, keys)}", key="--group-by")
        keyed = [(tuple((k, json.dumps(run.flat_config.get(k), sort_keys=True)) for k in group_by), run)
                 for run in runs]
    else:
        keyed = [(_method_key(run), run) for run in runs]
    order: dict[Any, list[Run]] = {}
    for key, run in keyed:
        order.setdefault(key, []).append(run)
    keys = [dict(key) for key in order]
    differing = sorted({k for key in keys for k, v in key.items() if any(other.get(k) != v for other in keys)})
    groups = []
    for key, members in zip(keys, order.values()):
        shown = [k for k in differing if k in key and _tells_apart(k, key, keys, differing)]
        label = ", ".join(f"{k}={_short(json.loads(key[k]))}" for k in shown) \
            or members[0].metrics.get("name", str(members[0].path))
        groups.append(Group(label, members))
    return groups


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tells_apart(k: str, key: dict[str, str], keys: list[dict[str, str]], differing: list[str]) -> bool:
    """Whether option ``k`` belongs in a group's label. Under a section whose component
    ``name`` differs between groups (``backbone.name``), an option is shown only if it also
    differs between the groups that chose the same component (the conv stem of two ViTs)."""
    section = k.rsplit(".", 1)[0] if "." in k else ""
    name_key = f"{section}.name"
    if not section or k == name_key or name_key not in differing:
        return True
    same_component = [other for other in keys if other.get(name_key) == key.get(name_key)]
    return any(other.get(k) != key[k] for other in same_component)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.mean(present), (statistics.stdev(present) if len(present) > 1 else None)


def format_mean_std(values: Sequence[float | None]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def last_probe_value(metrics: dict[str, Any], label: str, key: str) -> float | None:
    for result in reversed((metrics.get("probes") or {}).get(label) or []):
        if result and key in (result.get("summary") or {}):
            return result["summary"][key]
    return None


def table_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per group, mean ± std over its runs."""
    probe_columns = [c for c in PROBE_COLUMNS
                     if any(last_probe_value(r.metrics, c[0], c[1]) is not None for g in groups for r in g.runs)]
    summary_columns = SUMMARY_COLUMNS + [c for c in TASK_COLUMNS
                                         if any(c[1](r.metrics) is not None for g in groups for r in g.runs)]
    header = ["method", "runs", *(c[0] for c in summary_columns), *(c[2] for c in probe_columns)]
    rows = []
    for group in groups:
        row = [group.label, str(len(group.runs))]
        row += [format_mean_std([read(r.metrics) for r in group.runs]) for _, read in summary_columns]
        row += [format_mean_std([last_probe_value(r.metrics, label, key) for r in group.runs])
                for label, key, _ in probe_columns]
        rows.append(row)
    return header, rows


def format_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def per_step(groups: Sequence[Group], read: Any) -> list[tuple[str, list[float], list[float]]]:
    """(label, mean, std) per experience of a per-step series, for each group."""
    series = []
    for group in groups:
        values = [read(r.metrics) or [] for r in group.runs]
        length = max((len(v) for v in values), default=0)
        means, stds = [], []
        for step in range(length):
            mean, std = mean_std([v[step] if step < len(v) else None for v in values])
            means.append(float("nan") if mean is None else mean)
            stds.append(0.0 if std is None else std)
        series.append((group.label, means, stds))
    return series


def curves_figure(groups: Sequence[Group], read: Any, title: str) -> tuple[Any, int]:
    """Overlaid per-step curves (mean with a ± std band), and the number of series drawn.
    Every plotted metric is a percentage, so the band is clipped to [0, 100] (a forgetting of
    2 ± 3 is drawn from 0 to 5), and the experience axis has integer ticks only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = 0
    for label, means, stds in per_step(groups, read):
        if not means or all(m != m for m in means):
            continue
        steps = list(range(len(means)))
        ax.plot(steps, means, marker="o", label=label)
        ax.fill_between(steps, [max(0.0, m - s) for m, s in zip(means, stds)],
                        [min(100.0, m + s) for m, s in zip(means, stds)], alpha=0.2)
        drawn += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("after experience")
    ax.set_title(title, fontsize=10)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, drawn


def plot_curves(groups: Sequence[Group], read: Any, title: str, path: Path) -> int:
    """:func:`curves_figure` saved as ``path``; returns the number of series drawn."""
    fig, drawn = curves_figure(groups, read, title)
    fig.savefig(path)
    return drawn


def mean_matrix(group: Group) -> list[list[float]]:
    rows = min(len(r.metrics["accuracy_matrix"]) for r in group.runs)
    return [[statistics.mean(r.metrics["accuracy_matrix"][i][j] for r in group.runs) for j in range(i + 1)]
            for i in range(rows)]


def compare(paths: Sequence[Path], out: Path, group_by: Sequence[str] = ()) -> str:
    """Writes ``out/report.md`` and PNG plots; returns the text table."""
    with warnings.catch_warnings():
        return _compare(paths, out, group_by)


def _compare(paths: Sequence[Path], out: Path, group_by: Sequence[str]) -> str:
    from PIL import Image

    from .tensorboard import render_accuracy_matrix

    if not paths:
        raise UserError("name at least one run directory", key="RUN_DIR")
    from .run.directory import read_state

    paths, notes = expand_run_paths(paths)
    loaded = [load_run(p) for p in paths]
    # Unfinished runs would mix last-step numbers of different steps into one mean; a killed
    # run's metrics.json still says running, so its state comes from the run directory.
    states = {r.path: read_state(r.path) for r in loaded}
    runs, repeats = without_repeats([r for r in loaded if states[r.path].status == "complete"])
    notes += repeats
    skipped = [r for r in loaded if states[r.path].status != "complete"]
    if not runs:
        raise UserError(f"none of the {plural(len(loaded), 'run')} is complete "
                        f"({', '.join(sorted({states[r.path].status for r in loaded}))})", key="RUN_DIR")
    groups = group_runs(runs, group_by)
    header, rows = table_rows(groups)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror or exc}", key="--out") from None
    plots = [("accuracy.png", lambda m: m.get("accuracy"), "accuracy on seen classes (%)"),
             ("forgetting.png", lambda m: (m.get("forgetting") or {}).get("per_step"), "forgetting (max-based, %)")]
    for label, key, title in PROBE_COLUMNS:
        plots.append((f"probe_{label}_{key.replace('/', '_')}.png",
                      lambda m, label=label, key=key: [None if r is None else (r.get("summary") or {}).get(key)
                                                       for r in (m.get("probes") or {}).get(label) or []],
                      f"{title} per experience"))
    written = []
    warnings.filterwarnings("ignore", message=".*[Tt]ight.?layout")  # long legends; the plot is still drawn
    for name, read, title in plots:
        if plot_curves(groups, read, title, out / name):
            written.append(name)
        else:
            (out / name).unlink(missing_ok=True)
    for index, group in enumerate(groups):
        name = f"accuracy_matrix_{index}.png"
        Image.fromarray(render_accuracy_matrix(mean_matrix(group), f"{group.label} (mean of {len(group.runs)})")).save(out / name)
        written.append(name)
    lines = ["# Comparison", "", f"{len(runs)} runs in {len(groups)} groups; mean ± std over the runs of a group.",
             "Forgetting is max-based (PyCIL, FACIL); BWT as Lopez-Paz and Ranzato; probe columns at the last "
             "probed step.", "", format_markdown_table(header, rows), "", "## Runs", ""]
    lines += [f"- {group.label}: " + ", ".join(f"`{r.path}`" for r in group.runs) for group in groups]
    if skipped:
        lines += ["", "Left out (not complete): " + ", ".join(f"`{r.path}` ({states[r.path].label})" for r in skipped)]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in written]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    table = format_text_table(header, rows)
    if skipped:
        table += (f"\n(left out {plural(len(skipped), 'run')} that {'is' if len(skipped) == 1 else 'are'} not "
                  f"complete: {', '.join(f'{r.path} ({states[r.path].label})' for r in skipped)})")
    for note in notes:
        table += f"\n({note})"
    return table
