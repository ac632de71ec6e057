"""Raw, JPEG, NeRV and GAN memories on digits under the same budgets in bytes.

    python experiments/memory/run_memory.py [--seeds 1993 1994 1995] [--jobs 2] [--out runs/memory]
        [--report-only]

The default digits protocol (B0, 5 steps of 2 classes, 32 px grey images: 1,024 bytes each as
uint8) with ResNet-32 from scratch, 3 epochs per step, and a memory of the bytes of 20, 100 and
500 raw exemplars. Each memory is the real `incremental run` in its own process with one thread;
complete runs are kept, so the script can be stopped and started again. Writes results.md (keeping
its "## Reading" section) and accuracy_vs_bytes.png next to itself, and prints the table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import experiment_args, is_complete, mean_std, run_all, write_results  # noqa: E402

PROTOCOL = HERE.parents[1] / "protocols" / "digits_b0_5steps.yaml"
RAW_BYTES = 1024  # one 32 px grey exemplar as uint8
BUDGETS = {20: 20 * RAW_BYTES, 100: 100 * RAW_BYTES, 500: 500 * RAW_BYTES}
COMMON = ["backbone={name: resnet32}", "training.epochs=3", "output.tensorboard=false"]
# name -> (what it is, strategy, codec)
MEMORIES: dict[str, tuple[str, str, str]] = {
    "raw": ("raw replay (uint8 pixels)", "{name: replay, selection: herding}", "raw"),
    "jpeg": ("JPEG replay (Pillow, quality 50)", "{name: replay, selection: herding}", "{name: jpeg, quality: 50}"),
    "nerv": ("NeRV replay (per class, 8-bit, 40% pruned)", "{name: replay, selection: herding}",
             "{name: nerv, steps: 200, finetune_steps: 30, max_width: 16, lr: 5.0e-3, beta1: 0.9, "
             "quantization: per_tensor}"),
    "gan": ("GAN replay (hinge, SN, projection D, DiffAugment; float16 weights)",
            "{name: gan_replay, steps: 300, batch_size: 32, storage: float16, frechet_space: model}", "raw"),
}


def run_name(memory: str, raw: int, seed: int) -> str:
    return f"{memory}-{raw}raw-seed{seed}"


# The GAN's widest generator under the largest budget (width 128, 16 times the compute of width
# 32) would take this machine's afternoon: it is capped at width 32 (the 100-raw budget fits 16).
GAN_CAP = {500: "strategy.max_width=32"}


def jobs_for(seeds: list[int], out: Path, memories: dict[str, tuple[str, str, str]] = MEMORIES) -> list[tuple]:
    jobs = []
    for seed in seeds:
        for raw, budget in BUDGETS.items():
            for memory, (_, strategy, codec) in memories.items():
                sets = [f"seed={seed}", f"protocol.order_seed={seed}", f"strategy={strategy}",
                        f"protocol.memory={{bytes: {budget}, codec: {codec}}}", *COMMON]
                if memory == "gan" and raw in GAN_CAP:
                    sets.append(GAN_CAP[raw])
                jobs.append((PROTOCOL, out / run_name(memory, raw, seed), *sets))
    # the exemplar memories first, then the GAN (each of its runs takes several exemplar runs' time),
    # so a stopped script leaves whole cells of the table rather than one seed of everything
    return sorted(jobs, key=lambda job: (job[1].name.startswith("gan-"), job[1].name.startswith("gan-500")))


def load(out: Path, memory: str, raw: int, seeds: list[int]) -> list[dict]:
    return [json.loads((out / run_name(memory, raw, s) / "metrics.json").read_text())
            for s in seeds if is_complete(out / run_name(memory, raw, s))]


TITLE = "Memories in bytes: raw, JPEG, NeRV and GAN replay on digits"


def setup(seeds: list[int]) -> str:
    """The protocol, model, budgets and seeds, as the results files describe them."""
    return ("Digits (scikit-learn), B0, 5 steps of 2 classes, 32 px grey images; ResNet-32 from scratch, AdamW "
            "1e-3 with cosine, batch 32, 3 epochs per step. The budget is the bytes of 20, 100 or 500 raw "
            "exemplars (1,024 bytes each), split equally between the classes seen; herding ranks each class's "
            f"exemplars. Seeds {seeds} (each sets the run seed and the class order); mean ± std over seeds. "
            "Exemplars and PSNR are those held after the last step; PSNR is of the decoded exemplars against "
            "the originals (raw: lossless). ")


def report(out: Path, seeds: list[int]) -> str:
    lines = [setup(seeds) + "GAN: the generator's float16 weights are the whole memory; its "
             "columns give the current model's accuracy on generated samples and the Fréchet distance of their "
             "ResNet features to the test images' (after the last step); the widest generator that fits is used, "
             "capped at width 32 under the 500-raw budget (163,842 bytes: width 128 would take 16 times the "
             "compute). Wall: the run's training, evaluation "
             "and memory time, one CPU thread.", "",
             *table(out, seeds, MEMORIES)]
    return "\n".join(lines)


def table(out: Path, seeds: list[int], memories: dict[str, tuple[str, str, str]]) -> list[str]:
    """The results table's lines: one row per budget and memory."""
    lines = ["| budget | memory | avg inc acc | last acc | bytes used | exemplars | PSNR dB | generated acc | FD | wall s "
             "| runs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for raw, budget in BUDGETS.items():
        for memory, (label, _, _) in memories.items():
            runs = load(out, memory, raw, seeds)
            head = f"| {raw} raw ({budget:,} B) | {label} |"
            if len(runs) < len(seeds):  # no figure from fewer seeds than asked for
                lines.append(head + f" not yet run: {len(runs)} of {len(seeds)} runs complete; the command "
                             "continues them | | | | | | | | |")
                continue
            last = [m["memory"][-1] for m in runs]
            psnr = [r["psnr_db"] for r in last if r.get("psnr_db") is not None]
            gen = [r["generated_accuracy"] for r in last if r.get("generated_accuracy") is not None]
            fd = [r["frechet_distance"] for r in last if r.get("frechet_distance") is not None]
            lines.append(head + f" {mean_std([m['average_incremental_accuracy'] for m in runs])} | "
                         f"{mean_std([m['last_accuracy'] for m in runs])} | "
                         f"{statistics.mean(r['bytes'] for r in last):,.0f} | "
                         f"{statistics.mean(r['exemplars'] for r in last):.0f} | "
                         f"{mean_std(psnr) if psnr else ('lossless' if memory == 'raw' else '-')} | "
                         f"{mean_std(gen) if gen else '-'} | {mean_std(fd) if fd else '-'} | "
                         f"{statistics.mean(m['total_wall_time_s'] for m in runs):.0f} | {len(runs)} |")
    return lines


def plot(out: Path, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for memory, (label, _, _) in MEMORIES.items():
        xs, avg, last, avg_sd, last_sd = [], [], [], [], []
        for raw, budget in BUDGETS.items():
            runs = load(out, memory, raw, seeds)
            if len(runs) < len(seeds):
                continue
            values = [m["average_incremental_accuracy"] for m in runs], [m["last_accuracy"] for m in runs]
            xs.append(budget / 1024)
            avg.append(statistics.mean(values[0]))
            last.append(statistics.mean(values[1]))
            avg_sd.append(statistics.stdev(values[0]) if len(runs) > 1 else 0.0)
            last_sd.append(statistics.stdev(values[1]) if len(runs) > 1 else 0.0)
        for ax, ys, sd in ((axes[0], avg, avg_sd), (axes[1], last, last_sd)):
            ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=label.split(" (")[0])
    for ax, title in zip(axes, ("average incremental accuracy (%)", "last accuracy (%)")):
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis' minor labels overlap; the budgets are the ticks
        ax.set_xticks([b / 1024 for b in BUDGETS.values()], [f"{b / 1024:.0f}" for b in BUDGETS.values()])
        ax.set_xlabel("memory budget (KiB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"digits B0 5 steps, ResNet-32; mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = experiment_args(__doc__.splitlines()[0], "runs/memory")
    if not args.report_only:
        run_all(jobs_for(args.seeds, args.out), args.jobs)
    text = write_results(HERE, "experiments/memory/run_memory.py", TITLE, report(args.out, args.seeds))
    plot(args.out, args.seeds, HERE / "accuracy_vs_bytes.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
