"""NeRV's stored weights per output channel (asymmetric, the reference's) against one symmetric
step per tensor: the PSNR of the decoded digits and the bytes, from the same fits.

    python experiments/memory/nerv_quantisation.py [--seeds 1993 1994 1995] [--width 16]

Per seed: the first 16 training images of digits classes 0-4 (32 px), one NeRV each at the
codec's defaults (200 + 50 steps at lr 0.02, 40% pruned), fitted as one batch from the same
initial weights for both quantisations (so only the packing differs). Prints the mean PSNR over
the classes and the mean stored bytes per class, then mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from incremental.data.digits import build_digits
from incremental.data.options import DigitsConfig
from incremental.memory.codecs import payload_bytes, psnr_db
from incremental.memory.nerv import decode_frames, encode_many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1993, 1994, 1995])
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    splits = build_digits(DigitsConfig())
    images, targets = splits.train.images, splits.train.targets
    classes = [images[[i for i, t in enumerate(targets) if t == c]][:16] for c in range(5)]
    psnrs: dict[str, list[float]] = {"per_channel": [], "per_tensor": []}
    sizes: dict[str, list[float]] = {"per_channel": [], "per_tensor": []}
    for seed in args.seeds:
        for name in psnrs:
            fitted = encode_many(classes, [seed * 10 + k for k in range(len(classes))], width=args.width, levels=40,
                                 steps=200, lr=0.02, prune=0.4, finetune_steps=50, per_channel=name == "per_channel")
            psnrs[name].append(statistics.mean(psnr_db(decode_frames(p), c) for (p, _), c in zip(fitted, classes)))
            sizes[name].append(statistics.mean(payload_bytes(p) for p, _ in fitted))
            print(f"seed {seed} {name}: {psnrs[name][-1]:.2f} dB, {sizes[name][-1]:.0f} bytes per class", flush=True)
    for name in psnrs:
        print(f"{name}: {statistics.mean(psnrs[name]):.2f} ± {statistics.stdev(psnrs[name]):.2f} dB, "
              f"{statistics.mean(sizes[name]):.0f} bytes per class")


if __name__ == "__main__":
    main()
