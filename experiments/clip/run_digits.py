"""The vision-language methods on digits, from a CLIP the toolkit pretrained itself.

    python experiments/clip/run_digits.py [--seeds 1993 1994 1995] [--jobs 1]
        [--out runs/clip_digits] [--report-only]

No CLIP weights can be fetched here, so per seed the toolkit's ``clip-tiny`` (a 2-block ViT over
8-px patches and a 2-block text transformer) is trained with CLIP's contrastive loss
(``incremental.models.clip.pretrain_contrastive``: 400 AdamW steps of 128) on the training
images of the classes of experiences 0-2 of that seed's class order, each captioned "a photo of
a {name}.". Experiences 3 and 4 then bring 4 digits whose names the text tower never read: zero-
shot classification can only guess them, which is where the methods that train differ.

Then every method runs the default digits protocol (B0, 5 steps of 2 classes, 5 epochs per
step) from that checkpoint through ``backbone.pretrained``, each the real ``incremental`` command
in its own process. Complete runs are kept, so the script can be stopped and started again.
Writes results.md next to itself (keeping its "## Reading" section) and prints it.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import complete_runs, headline, mean_std, run_all, run_seeds_then_report  # noqa: E402

PRETRAIN_STEPS = 400
KNOWN_EXPERIENCES = 3  # experiences whose class names the pretraining captions use
NO_MEMORY = "protocol.memory={}"
# name -> (what it is, overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "zeroshot": ("zeroshot (all 10 names from the start)", ["strategy=zeroshot", NO_MEMORY]),
    "continual_clip": ("continual_clip (names seen so far)", ["strategy=continual_clip", NO_MEMORY]),
    "simplecil": ("SimpleCIL on the CLIP image tower", ["strategy=simplecil", NO_MEMORY]),
    "finetune": ("finetune from the text-initialised head", ["strategy=finetune", NO_MEMORY]),
    "clip_replay_nodistill": ("clip_replay, no distillation (200 exemplars)",
                              ["strategy={name: clip_replay, distill_weight: 0}"]),
    "clip_replay": ("clip_replay (200 exemplars)", ["strategy=clip_replay"]),
    # the protocol's LR (1e-3, for a ViT from scratch) is high for a pre-trained image tower
    "clip_replay_lr1e-4": ("clip_replay, LR 1e-4 (200 exemplars)", ["strategy=clip_replay",
                                                                    "training.optimizer.lr=1.0e-4"]),
    # measured with the paper's per-image fusion, the default before PROOF's became the repository's
    "proof": ("PROOF (200 exemplars)", ["strategy={name: proof, fusion: instance}"]),
}


def pretrain(seed: int, path: Path) -> str:
    """clip-tiny, contrastively trained on the known classes' training images (see the docstring)."""
    if path.is_file():
        return f"kept {path}"
    import copy

    import open_clip
    import torch

    from incremental.config import load_config
    from incremental.data import build_dataset
    from incremental.models.clip import TOOLKIT_ARCHITECTURES, pretrain_contrastive
    from incremental.protocol import make_class_split

    cfg, _ = load_config("digits_b0_5steps", [f"seed={seed}", f"protocol.order_seed={seed}"])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    known = [c for experience in split.experiences[:KNOWN_EXPERIENCES] for c in experience]
    indices = [i for i, y in enumerate(splits.train.targets) if y in known]
    images = torch.stack([splits.eval_transform(splits.train[i][0]) for i in indices]).expand(-1, 3, -1, -1)
    labels = torch.tensor([splits.train.targets[i] for i in indices])
    torch.manual_seed(seed)
    architecture = copy.deepcopy(TOOLKIT_ARCHITECTURES["clip-tiny"])
    architecture["vision_cfg"]["image_size"] = splits.image_size
    model = open_clip.CLIP(**architecture)
    captions = [f"a photo of a {name}." for name in splits.class_names]
    losses = pretrain_contrastive(model, images, captions, labels, steps=PRETRAIN_STEPS, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return (f"pretrained {path}: classes {known}, loss {losses[0]:.2f} -> "
            f"{statistics.mean(losses[-20:]):.2f}")


def run_seed(seed: int, out: Path, jobs: int) -> None:
    weights = out / f"clip-tiny-seed{seed}.pt"
    print(pretrain(seed, weights), flush=True)
    overrides = [f"seed={seed}", f"protocol.order_seed={seed}", "output.tensorboard=false", "training.epochs=5",
                 f"backbone={{name: clip, model: clip-tiny, pretrained: {weights}}}"]
    jobs_list = [("digits_b0_5steps", out / f"{name}-seed{seed}", *overrides, *sets)
                 for name, (_, sets) in METHODS.items()]
    run_all(jobs_list, jobs)


TITLE = "Vision-language methods on digits, from a CLIP the toolkit pretrained itself"


def report(out: Path, seeds: list[int]) -> str:
    lines = ["Digits (scikit-learn), B0, 5 steps of 2 classes at 32 px. Backbone: `clip-tiny` (2-block ViT, patch 8, "
             "width 64; 2-block text transformer), contrastively pretrained for each seed on the training images of "
             "experiences 0-2 of that seed's class order (6 digits, captions \"a photo of a {name}.\"), so the "
             "names of experiences 3-4 were never read by its text tower. Training as the protocol (AdamW 1e-3, "
             "batch 32) with 5 epochs per step; template \"a photo of a {}.\". Seeds " + str(seeds)
             + " (each sets the run seed and the class order); mean ± std over seeds. \"new names\" is the accuracy "
             "after the last step on the test images of experiences 3-4, \"known names\" on experiences 0-2.", "",
             "| method | memory | avg inc acc | last acc | known names (last) | new names (last) | forgetting "
             "| wall s | runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (label, sets) in METHODS.items():
        runs = complete_runs(out, name, seeds)
        if len(runs) < 3:  # no figure from fewer than 3 seeds
            lines.append(f"| {label} | - | - | - | - | - | - | - | {len(runs)} |")
            continue
        memory = 0 if NO_MEMORY in sets else 200

        def part(m: dict, experiences: range) -> float:
            row, sizes = m["accuracy_matrix"][-1], m["test_samples_per_experience"]
            return sum(row[j] * sizes[j] for j in experiences) / sum(sizes[j] for j in experiences)

        known = range(KNOWN_EXPERIENCES)
        new = range(KNOWN_EXPERIENCES, len(runs[0]["accuracy_matrix"]))
        h = headline(runs)
        lines.append(f"| {label} | {memory} | {h['avg']} | {h['last']} | {mean_std([part(m, known) for m in runs])} | "
                     f"{mean_std([part(m, new) for m in runs])} | {h['forgetting']} | {h['wall']} | {h['runs']} |")
    return "\n".join(lines)


def main() -> int:
    return run_seeds_then_report(__doc__, "runs/clip_digits", HERE, "experiments/clip/run_digits.py", TITLE,
                                 run_seed, report)


if __name__ == "__main__":
    sys.exit(main())
