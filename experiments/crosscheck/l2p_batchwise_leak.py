"""L2P's prompt choice at test time, PILOT's way against the toolkit's: how much task identity
class-sorted test batches leak into the accuracy.

    python experiments/crosscheck/l2p_batchwise_leak.py [--seeds 1993 1994 1995]
        [--out runs/pretrained_digits] [--batch-size 16]

Per seed, the L2P run of experiments/pretrained/run_digits.py (the same MAE encoder and
settings; runs already under --out are kept, so this shares them with that script). Its saved
model, after the last experience, classifies the test images of every class three ways:

- per image: each image's own top-k keys (the toolkit's evaluation);
- batchwise, class-sorted: batches of ``--batch-size`` (PILOT's exps/l2p.json: 16) of a test set
  ordered class by class, each batch taking its most frequent top-k keys (PILOT's
  ``batchwise_prompt``, which its L2P also applies at test time, on the test loader its
  DataManager builds by concatenating the classes);
- batchwise, shuffled: the same rule on batches in a random order, which separates the effect of
  the sorting from that of the rule.

Writes l2p_batchwise_leak.md next to itself (keeping its "## Reading" section) and prints it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "pretrained"))

from run_common import kept_reading, mean_std  # noqa: E402
from run_digits import METHODS, run_seed  # noqa: E402

WAYS = ("per image", "batchwise, class-sorted", "batchwise, shuffled")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--out", type=Path, default=Path("runs/pretrained_digits"))
    parser.add_argument("--batch-size", type=int, default=16, help="test batch size (PILOT's l2p.json: 16)")
    return parser.parse_args()


def test_set(run_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The run's saved model, and the test images (eval transform) and labels of the classes it saw."""
    from incremental.config import load_config
    from incremental.data import build_dataset
    from incremental.probes.offline import load_saved_model
    from incremental.protocol import OrderedClassSubset, make_class_split

    cfg, _ = load_config(str(run_dir / "config.yaml"))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    model, experience = load_saved_model(run_dir, cfg, splits, split)
    test = OrderedClassSubset(splits.test, split.class_order)
    labels = torch.as_tensor(list(test.targets))
    seen = labels < split.label_ranges()[experience].stop
    images = torch.stack([splits.eval_transform(test[i][0]) for i in range(len(test)) if seen[i]])
    return model.eval(), images, labels[seen]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
             batch_size: int, batchwise: bool) -> float:
    """Top-1 accuracy (%) with the test images in ``order``, ``batch_size`` at a time."""
    from incremental.models.net import classify
    from incremental.models.prompts import L2PPool

    pools = [m for m in model.modules() if isinstance(m, L2PPool)]
    assert pools, "not an L2P model"
    for pool in pools:
        pool.eval_batchwise = batchwise
    correct = 0
    for chunk in order.split(batch_size):
        correct += int((classify(model, images[chunk]).argmax(dim=1) == labels[chunk]).sum())
    return 100.0 * correct / len(order)


def measure(run_dir: Path, seed: int, batch_size: int) -> dict[str, float]:
    model, images, labels = test_set(run_dir)
    by_class = torch.argsort(labels, stable=True)
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    orders = {"per image": (by_class, False), "batchwise, class-sorted": (by_class, True),
              "batchwise, shuffled": (shuffled, True)}
    return {way: accuracy(model, images, labels, order, batch_size, batchwise)
            for way, (order, batchwise) in orders.items()}


def table(results: dict[int, dict[str, float]], batch_size: int) -> str:
    lines = [f"Last accuracy (%) of L2P on the test images of all 10 classes, batches of {batch_size}; "
             f"mean ± std over seeds {sorted(results)}.", "",
             "| test-time prompt choice | last accuracy | minus per image |", "|---|---:|---:|"]
    for way in WAYS:
        values = [r[way] for r in results.values()]
        gaps = [r[way] - r["per image"] for r in results.values()]
        lines.append(f"| {way} | {mean_std(values)} | {mean_std(gaps) if way != 'per image' else '-'} |")
    lines += ["", "Per seed: " + "; ".join(f"{seed}: " + ", ".join(f"{r[w]:.2f}" for w in WAYS)
                                           for seed, r in sorted(results.items()))]
    return "\n".join(lines)


def main() -> int:
    args = arguments()
    results = {}
    for seed in args.seeds:
        run_seed(seed, args.out, 1, methods={"l2p": METHODS["l2p"]})
        results[seed] = measure(args.out / f"l2p-seed{seed}", seed, args.batch_size)
        print(f"seed {seed}: {results[seed]}", flush=True)
    command = "python experiments/crosscheck/l2p_batchwise_leak.py " + " ".join(sys.argv[1:])
    text = "\n".join(["# L2P: PILOT's batchwise prompt choice at test time against per-image choice", "",
                      "Produced by", "", f"    {command}", "", table(results, args.batch_size)])
    results_file = HERE / "l2p_batchwise_leak.md"
    text += kept_reading(results_file)
    results_file.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
