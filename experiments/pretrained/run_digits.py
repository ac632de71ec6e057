"""The pre-trained-model methods on digits, from a ViT the toolkit pretrained itself.

    python experiments/pretrained/run_digits.py [--seeds 1993 1994 1995] [--jobs 1]
        [--out runs/pretrained_digits] [--report-only]

Per seed: `incremental pretrain-mae` on the training images of the base classes (experience 0
of that seed's class order; no labels, no test image, no later class), then every method on the
default digits protocol (B0, 5 steps of 2 classes) from that encoder, next to finetune, replay
and ViTIL started from the same encoder. The methods take no exemplars; replay and ViTIL keep
200. Every run is the real `incremental` command in its own process with one thread; complete
runs are kept, so the script can be stopped and started again. Writes results.md next to itself
(keeping its "## Reading" section) and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from run_common import complete_runs, headline, mean_std, run_all, run_incremental, run_seeds_then_report  # noqa: E402

MAE_CONFIG = HERE.parent / "backbones" / "digits" / "vit_mae_pretrain.yaml"  # 200 epochs, mask ratio 0.75
NO_MEMORY = "protocol.memory={}"
# 5 epochs per step (the protocol's 20 are for a ViT from scratch): every method starts from
# the pre-trained encoder, and 39 runs must fit an afternoon on 2 CPU cores
EPOCHS = "training.epochs=5"
# The prompt methods train only prompts, keys and a head from a frozen encoder: at 5 epochs (45
# steps a task) L2P's keys had moved 4% from their init (issue 30's review). 20 epochs give them
# 180 steps a task; PILOT's CIFAR runs take about 1,500 (5 epochs of 5,000 images in batches of 16)
PROMPT_EPOCHS = "training.epochs=20"
# name -> (what it is, overrides). The digits ViT is 128 wide with 4 blocks, so the adapters
# are 16 wide, DualPrompt's G/E layers are 0-1/2-3 and CODA's 0-3; RanPAC projects to 1000.
METHODS: dict[str, tuple[str, list[str]]] = {
    "finetune": ("finetune (from the MAE encoder)", ["strategy=finetune", NO_MEMORY]),
    "replay": ("replay, 200 exemplars (from the MAE encoder)", ["strategy={name: replay, selection: herding}"]),
    "vitil": ("ViTIL, 200 exemplars (from the MAE encoder)", ["strategy=vitil"]),
    "simplecil": ("SimpleCIL", ["strategy=simplecil", NO_MEMORY]),
    "aper_adapter": ("APER, adapters", ["strategy={name: aper, tuning: {name: adapter, bottleneck: 16}}", NO_MEMORY]),
    "aper_ssf": ("APER, SSF", ["strategy={name: aper, tuning: ssf}", NO_MEMORY]),
    "ranpac": ("RanPAC, adapters, M = 1000",
               ["strategy={name: ranpac, tuning: {name: adapter, bottleneck: 16}, projection_dim: 1000}", NO_MEMORY]),
    "ranpac_frozen": ("RanPAC, frozen, M = 1000",
                      ["strategy={name: ranpac, tuning: frozen, projection_dim: 1000}", NO_MEMORY]),
    "slca": ("SLCA", ["strategy=slca", NO_MEMORY]),
    "cofima": ("CoFiMA", ["strategy=cofima", NO_MEMORY]),
    "l2p": ("L2P", ["strategy={name: l2p, pool_size: 10, length: 5, top_k: 5}", NO_MEMORY, PROMPT_EPOCHS]),
    "dualprompt": ("DualPrompt", ["strategy={name: dualprompt, g_layers: [0, 1], e_layers: [2, 3]}", NO_MEMORY,
                                  PROMPT_EPOCHS]),
    "codaprompt": ("CODA-Prompt", ["strategy={name: codaprompt, pool_size: 100, length: 8, layers: [0, 1, 2, 3]}",
                                   NO_MEMORY, PROMPT_EPOCHS]),
    "ease": ("EASE", ["strategy={name: ease, bottleneck: 16}", NO_MEMORY]),
    "fecam": ("FeCAM, adapters", ["strategy={name: fecam, tuning: {name: adapter, bottleneck: 16}}", NO_MEMORY]),
    "inflora": ("InfLoRA, rank 10", ["strategy=inflora", NO_MEMORY, PROMPT_EPOCHS]),
    "lae": ("LAE, prefix", ["strategy=lae", NO_MEMORY]),
    "mos": ("MOS", ["strategy=mos", NO_MEMORY]),
    "grad_reweight": ("gradient reweighting (DGR), 200 exemplars", ["strategy=grad_reweight"]),
    "coil": ("Coil, 200 exemplars", ["strategy=coil"]),
    "memo": ("MEMO, 200 exemplars", ["strategy=memo"]),
    "expandable_representation": ("DER (Yan et al.), 200 exemplars", ["strategy=expandable_representation"]),
    "foster": ("FOSTER, 200 exemplars", ["strategy=foster"]),
    # the same methods with the optimizer of PILOT's exps (their crosscheck rows' settings) instead of
    # the protocol's AdamW 1e-3 with weight decay 0.05
    "coil_pilot_sgd": ("Coil, PILOT's SGD 1e-3, 200 exemplars",
                       ["strategy=coil", "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, weight_decay: 0.0005, "
                        "weight_decay_on: all}", "training.scheduler={name: constant}"]),
    "memo_pilot_sgd": ("MEMO, PILOT's SGD 1e-3, 200 exemplars",
                       ["strategy=memo", "training.optimizer={name: sgd, lr: 0.001, momentum: 0.9, weight_decay: 0.0002, "
                        "initial_weight_decay: 0.0005, weight_decay_on: all}", "training.scheduler={name: constant}"]),
    # PILOT's vit_memo starts the specialised block from PyTorch's default draws; this from the encoder's
    "memo_pretrained_copies": ("MEMO, specialised block from the encoder, 200 exemplars",
                               ["strategy={name: memo, specialised_init: pretrained}"]),
    # PILOT's merge before every block leaves the later sets within 1e-4 of set 0 (reference.md)
    "mos_per_step": ("MOS, merged once a step", ["strategy={name: mos, merge: per_step}", NO_MEMORY]),
    # the analytic methods at their reference's defaults (a buffer of 8192, gamma 0.1; DS-AL's C 0.6)
    "acil": ("ACIL, frozen, M = 8192", ["strategy=acil", NO_MEMORY]),
    "dsal": ("DS-AL, frozen, M = 8192", ["strategy=dsal", NO_MEMORY]),
}


def run_seed(seed: int, out: Path, jobs: int, methods: dict[str, tuple[str, list[str]]] | None = None) -> None:
    """The seed's MAE encoder, then each of ``methods`` (default: all) from it."""
    overrides = [f"seed={seed}", f"protocol.order_seed={seed}", "output.tensorboard=false"]
    mae_dir = out / f"mae-seed{seed}"
    print(run_incremental("pretrain-mae", MAE_CONFIG, mae_dir, *overrides, marker="mae_log.json"), flush=True)
    encoder = f"backbone.pretrained={mae_dir / 'encoder.safetensors'}"
    jobs_list = [("digits_b0_5steps", out / f"{name}-seed{seed}", *overrides, EPOCHS, encoder, *sets)
                 for name, (_, sets) in (METHODS if methods is None else methods).items()]
    run_all(jobs_list, jobs)


TITLE = "Pre-trained-model methods on digits, from the toolkit's own MAE encoder"


def report(out: Path, seeds: list[int]) -> str:
    lines = ["Digits (scikit-learn), B0, 5 steps of 2 classes, the default protocol's ViT (patch 4, 128 wide, 4 "
             "blocks, mean-pooled) initialised from `incremental pretrain-mae` on the 2 base classes' training "
             "images of that seed's class order (200 epochs, mask ratio 0.75). Training as the protocol: AdamW "
             "1e-3, batch 32, 5 epochs per step (APER, RanPAC and FeCAM: the first step only; SimpleCIL, ACIL and DS-AL: "
             "none; L2P, DualPrompt, CODA-Prompt and InfLoRA: 20). Seeds " + str(seeds) + " (each sets the run seed and the class order); mean ± std "
             "over seeds. After the last step: task-IL accuracy is the argmax within the true experience's "
             "classes; task identification, how often the argmax over all classes falls in the true experience "
             "(metrics.json's definitions).", "",
             "| method | memory | avg inc acc | last acc | last task-IL acc | last task identification | forgetting "
             "| trained params (most in a step) | wall s | runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (label, sets) in METHODS.items():
        runs = complete_runs(out, name, seeds)
        if not runs:
            lines.append(f"| {label} | - | - | - | - | - | - | - | - | 0 |")
            continue
        memory = 0 if NO_MEMORY in sets else 200
        trained = max(runs[0].get("trained_params") or [0])  # the most any step trained
        h = headline(runs)
        task_il = mean_std([m["task_il_accuracy"][-1] for m in runs])
        task_id = mean_std([m["task_identification"][-1] for m in runs])
        lines.append(f"| {label} | {memory} | {h['avg']} | {h['last']} | {task_il} | {task_id} | {h['forgetting']} | "
                     f"{trained:,} | {h['wall']} | {h['runs']} |")
    return "\n".join(lines)


def main() -> int:
    return run_seeds_then_report(__doc__, "runs/pretrained_digits", HERE, "experiments/pretrained/run_digits.py", TITLE, run_seed, report)


if __name__ == "__main__":
    sys.exit(main())
