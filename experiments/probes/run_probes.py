"""Robustness after each step on digits: ViT, ViT with a conv stem, and ResNet-32, every
probe after every experience (experiments/probes/digits/all_probes.yaml).

    python experiments/probes/run_probes.py [--seeds 1993] [--jobs 2] [--out runs/probes_digits]
        [--report-only]

Also runs the shipped protocol `digits_b0_5steps_probes` (the default probe suite) to
measure its cost per step. Each run is the real `incremental run` in its own process with
one thread; complete runs are kept. Writes results.md (tables per step and the cost of each probe) and plots/*.png
next to this file, and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import complete_runs, kept_reading, mean_std, run_all  # noqa: E402

CONFIGS = {"vit": "ViT", "vit_conv_stem": "ViT, conv stem", "resnet32": "ResNet-32"}
DEFAULT_SUITE = "digits_b0_5steps_probes"  # the shipped protocol: default protocol + default probe suite

# (probe label, summary key, column title) for the per-step tables
COLUMNS = [
    ("corruptions", "clean_accuracy", "clean acc"),
    ("corruptions", "mean_accuracy", "corrupted acc (mean of 75)"),
    ("masking", "cutout/0.2", "CutOut 20%"),
    ("masking", "patch_drop/0.2", "patch drop 20%"),
    ("fourier", "error/high", "Fourier err, high freq"),
    ("adversarial", "linf/0.00784", "PGD L-inf 2/255"),
    ("adversarial", "l2/0.25", "PGD L2 0.25"),
    ("dct_spectrum", "pgd/low", "PGD energy low band"),
    ("ood", "auroc/max_logit", "OOD AUROC max-logit"),
    ("ood", "worst_auroc/max_logit", "worst-case AUROC"),
]


def load(out: Path, stem: str, seeds: list[int]) -> list[dict]:
    return complete_runs(out, stem, seeds)


def value(metrics: dict, label: str, key: str, step: int) -> float | None:
    result = metrics["probes"].get(label, [None] * (step + 1))[step]
    return None if result is None else result["summary"].get(key)


def report(out: Path, seeds: list[int], command: str) -> str:
    lines = ["# Robustness after each step on digits", "", "Produced by", "", f"    {command}", "",
             "The default digits protocol (B0, 5 steps of 2 classes, herding replay with 200 exemplars, "
             "20 epochs per step) with every probe after every step, on the test images of the classes "
             f"seen so far (probe settings: `digits/all_probes.yaml`). Seeds {seeds}; mean ± std over seeds "
             "where there are several. One CPU thread per run, two runs at a time on a 2-core machine.", ""]
    for stem, title in CONFIGS.items():
        runs = load(out, stem, seeds)
        if not runs:
            lines += [f"## {title}", "", "no complete run", ""]
            continue
        lines += [f"## {title}", "", "| step | acc (all seen) | " + " | ".join(c[2] for c in COLUMNS) + " |",
                  "|---|---:|" + "---:|" * len(COLUMNS)]
        for step in range(runs[0]["num_experiences"]):
            cells = [mean_std([m["accuracy"][step] for m in runs])]
            cells += [mean_std([value(m, label, key, step) for m in runs]) for label, key, _ in COLUMNS]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Cost of each probe", "",
              "Seconds per step (mean over steps and runs) and as a share of the same step's training time.", "",
              "| backbone | train s/step | " + " | ".join(f"{p} s (%)" for p in PROBES) + " |",
              "|---|---:|" + "---:|" * len(PROBES)]
    for stem, title in CONFIGS.items():
        runs = load(out, stem, seeds)
        if not runs:
            continue
        train = [w["train"] for m in runs for w in m["wall_time_s"]]
        cells = []
        for probe in PROBES:
            seconds = [r["time_s"] for m in runs for r in m["probes"].get(probe, []) if r]
            shares = [r["time_s"] / w["train"] for m in runs
                      for r, w in zip(m["probes"].get(probe, []), m["wall_time_s"]) if r]
            cells.append(f"{statistics.mean(seconds):.1f} ({100 * statistics.mean(shares):.0f}%)" if seconds else "-")
        lines.append(f"| {title} | {statistics.mean(train):.1f} | " + " | ".join(cells) + " |")
    suite = load(out, "default_suite", seeds)
    if suite:
        lines += ["", "## The default suite", "",
                  f"`incremental run {DEFAULT_SUITE}`: the default protocol with `probes: [corruptions, masking, "
                  "ood]` at their default options (20, 100 and 500 images). Probe time per step against the "
                  "step's training time (target: at most 20%):", "",
                  "| step | train s | " + " | ".join(f"{p} s" for p in suite[0]["probes"]) + " | probes / train |",
                  "|---|---:|" + "---:|" * (len(suite[0]["probes"]) + 1)]
        for step in range(suite[0]["num_experiences"]):
            train = statistics.mean(m["wall_time_s"][step]["train"] for m in suite)
            probe_s = [statistics.mean(m["probes"][p][step]["time_s"] for m in suite) for p in suite[0]["probes"]]
            lines.append(f"| {step} | {train:.1f} | " + " | ".join(f"{v:.1f}" for v in probe_s)
                         + f" | {100 * sum(probe_s) / train:.1f}% |")
    return "\n".join(lines) + "\n"


PROBES = ("corruptions", "masking", "fourier", "adversarial", "dct_spectrum", "ood")


def plot(out: Path, seeds: list[int]) -> list[Path]:
    """One PNG per column: the value after each step, one line per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = HERE / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    for label, key, title in [("accuracy", None, "accuracy on seen classes")] + COLUMNS:
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
        for stem, name in CONFIGS.items():
            runs = load(out, stem, seeds)
            if not runs:
                continue
            steps = range(runs[0]["num_experiences"])
            series = [[m["accuracy"][s] if key is None else value(m, label, key, s) for m in runs] for s in steps]
            means = [statistics.mean(v for v in vals if v is not None) if any(v is not None for v in vals)
                     else float("nan") for vals in series]
            if all(m != m for m in means):  # NaN throughout: the probe does not apply (patch drop on a CNN)
                continue
            ax.plot(list(steps), means, marker="o", label=name)
            ax.set_xticks(list(steps))
        ax.set_xlabel("after experience")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{label}_{(key or 'seen').replace('/', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/probes_digits"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        jobs = [(HERE / "digits" / f"{stem}.yaml", args.out / f"{stem}-seed{seed}", f"seed={seed}",
                 f"protocol.order_seed={seed}") for seed in args.seeds for stem in CONFIGS]
        jobs += [(Path(DEFAULT_SUITE), args.out / f"default_suite-seed{seed}", f"seed={seed}",
                  f"protocol.order_seed={seed}") for seed in args.seeds]
        run_all(jobs, args.jobs)
    command = "python experiments/probes/run_probes.py --seeds " + " ".join(map(str, args.seeds))
    text = report(args.out, args.seeds, command)
    (HERE / "results.md").write_text(text + "\n" + kept_reading(HERE / "results.md"))
    plot(args.out, args.seeds)
    print(text)


if __name__ == "__main__":
    main()
