"""A method against its reference with the data held fixed and only the random draws varied.

Where a short training leaves the heads near their random draw (InfLoRA's 60 Adam steps a task
at 5e-4 on these digits, LAE's 15), which task wins an image depends on how the draws compare,
and a 3-seed row cannot tell a difference in the method from one in the draws. This script holds
the data seed (class order, split) and the shared MAE ViT at one value and varies the run seed
on both sides: the toolkit's ``seed`` (its head rows, PET draws and shuffles) and the
reference's ``torch.manual_seed`` before it builds its learner. It prints each init seed's curve
on both sides and the mean ± std over the init seeds.

    python experiments/crosscheck/init_seeds.py --method lae --pilot-root /tmp/pilot/repo --out /tmp/xmae \\
        --data-seed 1993 --init-seeds 1 2 3 4
    python experiments/crosscheck/init_seeds.py --method inflora_20_epochs --inflora-root /tmp/refs/inflora \\
        --out /tmp/xmae --init-seeds 1 2 3 4 [--ours-set "training.scheduler={name: cosine, min_lr_ratio: 0.0}"]

``--method`` is a row of reference.py run against PILOT or InfLoRA; ``--ours-set`` adds overrides
to the toolkit's side only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inflora_reference import run_inflora  # noqa: E402
from pilot_models import shared_vit  # noqa: E402
from reference import EXTERNAL_METHODS, METHODS, DigitsManager, import_pilot, run_ours, run_pilot, vit_backbone  # noqa: E402
from run_common import mean_std  # noqa: E402

INFLORA_METHODS = [name for name, row in EXTERNAL_METHODS.items() if row[1] == "inflora_root"]


def reference_curve(args: argparse.Namespace, init: int, vit_path: Path, manager: DigitsManager) -> list[float]:
    """The reference's accuracy after each step for this init seed, cached in ``--out``."""
    inflora = args.method in INFLORA_METHODS
    cache = args.out / f"{'reference' if inflora else 'pilot'}-{args.method}-data{args.data_seed}-init{init}.json"
    if not cache.is_file():
        if inflora:
            curve = run_inflora(args.inflora_root.resolve(), init, vit_path, manager, EXTERNAL_METHODS[args.method][2])
        else:
            import_pilot(args.pilot_root.resolve())
            curve = run_pilot(args.pilot_root.resolve(), args.method, args.data_seed, vit_path, manager,
                              init_seed=init)["pilot"]
        cache.write_text(json.dumps(curve))
    return json.loads(cache.read_text())


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=[*INFLORA_METHODS, *METHODS], required=True)
    parser.add_argument("--pilot-root", type=Path, help="a checkout of LAMDA-PILOT (PILOT's methods)")
    parser.add_argument("--inflora-root", type=Path, help="a checkout of liangyanshuo/InfLoRA (the inflora rows)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-seed", type=int, default=1993)
    parser.add_argument("--init-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--ours-set", action="append", default=[], help="an override of the toolkit's side only")
    args = parser.parse_args()
    root = "inflora_root" if args.method in INFLORA_METHODS else "pilot_root"
    if getattr(args, root) is None:
        parser.error(f"{args.method} runs against the reference code: give --{root.replace('_', '-')}")
    return args


def main() -> int:
    args = arguments()
    vit_path = shared_vit(args.data_seed, args.out, "mae")
    manager = DigitsManager(args.data_seed)
    tag = hashlib.sha256("\n".join(args.ours_set).encode()).hexdigest()[:8] if args.ours_set else "defaults"
    rows = []
    for init in args.init_seeds:
        reference = reference_curve(args, init, vit_path, manager)
        metrics = run_ours(args.method, args.data_seed, vit_backbone(vit_path),
                           args.out / f"{args.method}-{tag}-data{args.data_seed}-init{init}",
                           extra=[f"seed={init}", *args.ours_set])
        ours = metrics["accuracy"]
        rows.append((init, ours, reference))
        print(f"init {init}: ours {[round(a, 2) for a in ours]}, reference {reference}", flush=True)
    print("\n| side | after task 2 | last | average incremental |\n|---|---:|---:|---:|")
    for side, index in (("ours", 1), ("reference", 2)):
        curves = [row[index] for row in rows]
        print(f"| {side} | {mean_std([c[1] for c in curves])} | {mean_std([c[-1] for c in curves])} | "
              f"{mean_std([statistics.mean(c) for c in curves])} |")
    gaps = [statistics.mean(o) - statistics.mean(r) for _, o, r in rows]
    print(f"\naverage incremental gap (ours - reference, per init seed): {mean_std(gaps)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
