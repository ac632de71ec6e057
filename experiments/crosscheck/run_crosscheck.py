"""The toolkit's strategies against Avalanche's own, on the same benchmark and model.

    python experiments/crosscheck/run_crosscheck.py [--seeds 1993 1994 1995] [--epochs 5] [--out runs/crosscheck]

For each strategy and seed: the toolkit's run through `incremental run` (a subprocess), and
Avalanche's strategy built in this process on the very benchmark, model initialisation,
optimizer and LR schedule the toolkit builds for that seed (``incremental.run.loop.build``),
evaluated by the toolkit's recorder, so that only the strategy differs. Writes results.md next
to this file: mean ± std of average incremental and last accuracy over the seeds, and the gap.
Rerun it whenever a strategy changes.

Pairs (toolkit strategy = Avalanche strategy):

- finetune = Naive; replay (random selection, 200 in total) = Naive + ReplayPlugin with a
  class-balanced buffer of 200;
- lwf (alpha 1, T 2) = LwF(alpha=1, temperature=2); ewc (lambda 1000, separate) = EWC(1000, "separate");
- gdumb (200) = GDumb(mem_size=200); icarl (NCM, 200) = ICaRL (fixed sigmoid head, NCM, memory 200).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_common import kept_reading, mean_std, run_incremental  # noqa: E402

PROTOCOL = "digits_b0_5steps"
PAIRS = {  # our strategy override -> how Avalanche's is built (see avalanche_strategy)
    "finetune": "strategy=finetune",
    "replay": "strategy={name: replay, selection: random}",
    "lwf": "strategy={name: lwf, alpha: 1.0, temperature: 2.0}",
    "ewc": "strategy={name: ewc, ewc_lambda: 1000.0, mode: separate}",
    "gdumb": "strategy=gdumb",
    "icarl": "strategy={name: icarl, classifier: ncm}",
}


def overrides(strategy: str, seed: int, epochs: int) -> list[str]:
    return [PAIRS[strategy], "backbone={name: resnet32}", f"training.epochs={epochs}", f"seed={seed}",
            "output.tensorboard=false"]


def avalanche_strategy(name: str, built: Any, cfg: Any) -> Any:
    """Avalanche's strategy of ``name`` on the toolkit's model, with the toolkit's optimizer
    (a fresh AdamW and cosine schedule per experience) and its evaluation recorder."""
    import torch
    from avalanche.training import EWC, GDumb, ICaRL, LwF, Naive
    from avalanche.training.plugins import ReplayPlugin
    from avalanche.training.storage_policy import ClassBalancedBuffer

    from incremental.training.plugins import silent_evaluator

    common = dict(train_mb_size=cfg.training.batch_size, train_epochs=cfg.training.epochs,
                  eval_mb_size=cfg.training.eval_batch_size, device="cpu", evaluator=silent_evaluator(),
                  plugins=[built.optimization, built.recorder])
    model, optimizer = built.model, torch.optim.SGD(built.model.parameters(), lr=0.1)  # replaced per experience
    memory = 200
    if name != "icarl":  # ICaRL brings its own loss
        common["criterion"] = torch.nn.CrossEntropyLoss()
    if name == "finetune":
        return Naive(model=model, optimizer=optimizer, **common)
    if name == "replay":
        buffer = ClassBalancedBuffer(max_size=memory, adaptive_size=True)
        common["plugins"] = [*common["plugins"], ReplayPlugin(mem_size=memory, storage_policy=buffer)]
        return Naive(model=model, optimizer=optimizer, **common)
    if name == "lwf":
        return LwF(model=model, optimizer=optimizer, alpha=1.0, temperature=2.0, **common)
    if name == "ewc":
        return EWC(model=model, optimizer=optimizer, ewc_lambda=1000.0, mode="separate", **common)
    if name == "gdumb":
        return GDumb(model=model, optimizer=optimizer, mem_size=memory, **common)
    # ICaRL: a feature extractor and a fixed sigmoid head over all classes, its own NCM
    features = _Features(model.backbone)  # without the toolkit's growing head
    head = torch.nn.Linear(model.num_features, sum(built.class_split.classes_per_experience))
    return ICaRL(feature_extractor=features, classifier=head, optimizer=optimizer, memory_size=memory,
                 buffer_transform=None, fixed_memory=True, **common)


class _Features:
    """A backbone's pooled features, as Avalanche's ICaRL wants a feature extractor."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class Features(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

        return Features()


def run_avalanche(name: str, seed: int, epochs: int, out: Path) -> dict[str, Any]:
    """Avalanche's ``name`` on the toolkit's benchmark, model and optimizer for ``seed``."""
    path = out / f"avalanche-{name}-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from incremental.config import load_config
    from incremental.distributed import SINGLE
    from incremental.metrics import summarize
    from incremental.run.loop import build

    cfg, _ = load_config(PROTOCOL, overrides("finetune", seed, epochs))
    built = build(cfg, SINGLE, quiet=True, echo=print)  # seeded exactly as `incremental run` is
    benchmark = built.benchmark
    # Avalanche's ICaRL reads these two, which class_incremental_benchmark does not set
    benchmark.classes_order = list(range(len(built.class_split.class_order)))
    benchmark.n_classes_per_exp = list(built.class_split.classes_per_experience)
    strategy = avalanche_strategy(name, built, cfg)
    matrix = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, experience in enumerate(benchmark.train_stream):
            object.__setattr__(experience, "benchmark", benchmark)  # ICaRL's plugin reads it too
            strategy.train(experience, reset_optimizer_state=True)
            strategy.eval(benchmark.test_stream[: i + 1])
            matrix.append(built.recorder.accuracies(i + 1))
    sizes = [len(exp.dataset) for exp in benchmark.test_stream]
    result = summarize(matrix, sizes)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/crosscheck"))
    parser.add_argument("--strategies", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = parser.parse_args()
    rows = []
    for name in args.strategies:
        ours, theirs = [], []
        for seed in args.seeds:
            run_dir = args.out / f"ours-{name}-seed{seed}"
            print(run_incremental("run", PROTOCOL, run_dir, *overrides(name, seed, args.epochs)), flush=True)
            ours.append(json.loads((run_dir / "metrics.json").read_text()))
            theirs.append(run_avalanche(name, seed, args.epochs, args.out))
            print(f"  {name} seed {seed}: ours {ours[-1]['average_incremental_accuracy']:.2f}, "
                  f"Avalanche {theirs[-1]['average_incremental_accuracy']:.2f}", flush=True)
        rows.append((name, ours, theirs))
    lines = ["# Cross-check: the toolkit's strategies against Avalanche's own", "",
             f"`python experiments/crosscheck/run_crosscheck.py --seeds {' '.join(map(str, args.seeds))} "
             f"--epochs {args.epochs}` (2-core CPU). Protocol `{PROTOCOL}` (digits, B0, 5 steps of 2 classes, "
             f"seed-1993 class order), ResNet-32, {args.epochs} epochs per experience, AdamW 1e-3 with a cosine "
             "schedule restarted each experience, batch 32, memory 200 where a strategy keeps one. Both sides get "
             "the same benchmark, initial weights, optimizer and evaluation (the toolkit's recorder); mean ± std "
             f"over {len(args.seeds)} seeds, accuracies in %.", "",
             "| strategy | avg inc acc, ours | avg inc acc, Avalanche | gap | last acc, ours | last acc, Avalanche | gap |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, ours, theirs in rows:
        cells = []
        for key in ("average_incremental_accuracy", "last_accuracy"):
            a, b = [m[key] for m in ours], [m[key] for m in theirs]
            cells += [mean_std(a), mean_std(b), f"{statistics.mean(a) - statistics.mean(b):+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    results = HERE / "results.md"
    results.write_text("\n".join(lines) + "\n" + kept_reading(results))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
