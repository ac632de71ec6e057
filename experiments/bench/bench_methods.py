"""Wall time by phase and peak memory of each strategy on the digits protocol.

    python experiments/bench/bench_methods.py [--cases simplecil ranpac ...] [--seeds 1993 1994 1995]
        [--code PATH --label before] [--out runs/bench_methods] [--report]

Each case is one `incremental run digits_b0_5steps` in a subprocess (all of the machine's
threads, one run at a time), timed under /usr/bin/time for its peak RSS. From its metrics.json:
training (without the phases below), the strategies' feature pass, closed-form solve (RanPAC's
Gram update and ridge), memory encoding (a byte memory's codec, GAN training), evaluation and
probes, summed over the experiences (5; 10 for the ``_10steps`` cases, one class each); and the run's wall time.

``--code PATH`` runs the `incremental` installed under PATH (``pip install --no-deps --target
PATH <checkout>``) instead of this one, to measure an older version side by side: its rows are
labelled ``--label``. Options an older version lacks (the feature cache) are left out for it.

The same process times two fp64 Cholesky factorisations of a 10,000 x 10,000 matrix (RanPAC's
M), the yardstick of RanPAC's target, and records the GPU when the runs used one. ``--report``
writes methods.md beside this file from every row collected under ``--out`` (its hand-written
"## Reading" section kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOCOL = "digits_b0_5steps"
NERV = "protocol.memory={bytes: 400000, codec: nerv}"
RAW = "protocol.memory={bytes: 400000, codec: raw}"
FROZEN_RANPAC = "strategy={name: ranpac, tuning: frozen}"
CASES: dict[str, list[str]] = {  # name -> --set values; "+nocache": the same with the cache off
    "simplecil": ["strategy=simplecil"],
    "simplecil+nocache": ["strategy=simplecil", "training.feature_cache_mb=0"],
    "simplecil_10steps": ["strategy=simplecil", "protocol.increment=1"],
    "simplecil_10steps+nocache": ["strategy=simplecil", "protocol.increment=1", "training.feature_cache_mb=0"],
    "ranpac_frozen": [FROZEN_RANPAC],
    "ranpac_frozen+nocache": [FROZEN_RANPAC, "training.feature_cache_mb=0"],
    "aper_adapter": ["strategy=aper"],
    "aper_adapter+nocache": ["strategy=aper", "training.feature_cache_mb=0"],
    "aper_adapter_10steps": ["strategy=aper", "protocol.increment=1"],
    "aper_adapter_10steps+nocache": ["strategy=aper", "protocol.increment=1", "training.feature_cache_mb=0"],
    "replay_raw_400kB": [RAW],
    "replay_nerv_400kB": [NERV],
    "gan_replay": ["strategy=gan_replay"],
}
# Phases a strategy times inside training (metrics.json's phase keys), shown apart from it.
PHASES = {"feature_pass": "feature pass", "closed_form": "closed form", "memory_encoding": "memory encoding",
          "generator_training": "memory encoding"}
COLUMNS = ["wall", "train", "feature pass", "closed form", "memory encoding", "eval", "eval earlier", "probes"]


def cholesky_seconds(m: int = 10_000) -> float:
    """Seconds for two fp64 Cholesky factorisations of an m x m positive definite matrix."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, 256, dtype=torch.float64, generator=generator)
    matrix = a @ a.T
    matrix.diagonal().add_(1.0)
    start = time.perf_counter()
    for _ in range(2):
        torch.linalg.cholesky(matrix)
    return time.perf_counter() - start


def run_case(case: str, seed: int, out: Path, code: Path | None) -> dict:
    """One run of ``case`` at ``seed``; its phase seconds, wall and peak RSS (MB)."""
    sets = [s for s in CASES[case] if code is None or "feature_cache" not in s]
    out = out.resolve()
    run_dir = out / f"{case}_seed{seed}"
    rss_file = out / f"{case}_seed{seed}.rss"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
    args = [*timer, sys.executable, "-m", "incremental", "run", PROTOCOL,
            "--quiet", "--out", str(run_dir), "--set", f"seed={seed}", "--set", "protocol.order_seed=" + str(seed)]
    for value in sets:
        args += ["--set", value]
    start = time.perf_counter()
    # run outside any checkout: `python -m` puts the working folder first on sys.path, and a
    # checkout's incremental/ there would shadow the version under test
    result = subprocess.run(args, env=env, capture_output=True, text=True, cwd=out)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{case} failed: {result.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {column: 0.0 for column in COLUMNS}
    for step in metrics["wall_time_s"]:
        inside = 0.0
        for key, column in PHASES.items():
            row[column] += step.get(key, 0.0)
            inside += step.get(key, 0.0)
        row["train"] += step["train"] - inside
        row["eval"] += step["eval"]
        row["eval earlier"] += step.get("eval_earlier", 0.0)  # inside eval: the earlier experiences' test data
        row["probes"] += step["probes"]
    row["wall"] = wall
    row["peak RSS MB"] = int(rss_file.read_text().split()[-1]) / 1024 if timer else None  # GNU time's %M: KB
    row["last acc"] = metrics["last_accuracy"]
    psnr = (metrics.get("memory") or [None])[-1]
    row["psnr dB"] = psnr.get("psnr_db") if isinstance(psnr, dict) else None
    return row


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def collect(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.jsonl"
    yardstick = cholesky_seconds()
    print(f"two fp64 Cholesky factorisations of 10,000 x 10,000: {yardstick:.2f} s", flush=True)
    with rows_file.open("a") as rows:
        rows.write(json.dumps({"yardstick": yardstick, "label": args.label, "gpu": gpu_name()}) + "\n")
        for case in args.cases:
            for seed in args.seeds:
                row = run_case(case, seed, args.out / args.label, args.code)
                row.update(case=case, seed=seed, label=args.label)
                rows.write(json.dumps(row) + "\n")
                rows.flush()
                print(f"{args.label} {case} seed {seed}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)), flush=True)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(out: Path) -> str:
    """methods.md's tables from the rows under ``out``: every case by label, then the targets."""
    lines = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    yardsticks = [line["yardstick"] for line in lines if "yardstick" in line]
    rows = [line for line in lines if "case" in line]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["label"]), []).append(row)
    fields = [*COLUMNS, "peak RSS MB", "last acc", "psnr dB"]
    text = ["| case | code | seeds | " + " | ".join(f"{f} s" if f in COLUMNS else f for f in fields) + " |",
            "|---|---|---:|" + "---:|" * len(fields)]
    for (case, label), group in sorted(groups.items(), key=lambda item: (list(CASES).index(item[0][0]), item[0][1])):
        cells = [_mean_std([r[f] for r in group if r.get(f) is not None]) for f in fields]
        text.append(f"| {case} | {label} | {len(group)} | " + " | ".join(cells) + " |")
    text += ["", f"Two fp64 Cholesky factorisations of 10,000 x 10,000 on this machine: "
                 f"{_mean_std(yardsticks)} s ({len(yardsticks)} measurements)."]
    return "\n".join(text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--code", type=Path, default=None, help="an older `incremental`, pip-installed with --target")
    parser.add_argument("--label", default="this")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_methods"))
    parser.add_argument("--report", action="store_true", help="print the tables of the rows collected so far")
    args = parser.parse_args()
    if args.report:
        results = HERE / "methods.md"
        old = results.read_text() if results.is_file() else ""
        reading = old[old.index("\n## Reading"):] if "\n## Reading" in old else ""
        text = (f"# Strategies by phase on digits_b0_5steps\n\nProduced by `python experiments/bench/bench_methods.py"
                f" ...` (the commands are in the reading); rows under `{args.out}`. Seconds summed over the run's "
                f"experiences; mean ± std where a case ran over several seeds.\n\n{report(args.out)}{reading}")
        results.write_text(text)
        print(text)
        return
    collect(args)


if __name__ == "__main__":
    main()
