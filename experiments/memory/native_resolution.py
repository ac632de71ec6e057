"""Raw replay at the digits' native resolution against raw and JPEG replay at 32 px, in the same bytes.

    python experiments/memory/native_resolution.py [--seeds 1993 1994 1995] [--jobs 2]
        [--out runs/memory] [--report-only]

The digits are scikit-learn's 8 x 8 images with 17 grey levels, upsampled by the dataset to
32 px: a raw 32-px exemplar spends 1,024 bytes on 64 values, so a codec ranked against it is
ranked partly on how much of that redundancy it removes. The baseline that removes exactly that
redundancy and nothing else is raw replay stored at 8 px (``codec: {name: raw, size: 8}``:
64 bytes an exemplar, plus 4 per class for the original size), which decodes to the training
images (89 dB; ``incremental.memory.codecs.fitted_downsample``). It runs here next to raw and
JPEG (quality 50) at 32 px under run_memory.py's protocol, model and budgets; the run
directories are run_memory.py's too, so the two scripts share the raw and JPEG runs. Writes
native_resolution.md next to itself (keeping its "## Reading" section) and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import run_memory  # noqa: E402
from run_memory import setup  # noqa: E402
from run_common import experiment_args, run_all, write_results  # noqa: E402

MEMORIES = {
    "raw": run_memory.MEMORIES["raw"],
    "raw8": ("raw replay stored at 8 px, the digits' native resolution (64 B each)",
             "{name: replay, selection: herding}", "{name: raw, size: 8}"),
    "jpeg": run_memory.MEMORIES["jpeg"],
}
TITLE = "Memories in bytes on digits: raw replay at the native 8 x 8 resolution"


def report(out: Path, seeds: list[int]) -> str:
    lines = [setup(seeds) + "Wall: the run's training, evaluation and memory time, one "
             "CPU thread.", "", *run_memory.table(out, seeds, MEMORIES)]
    return "\n".join(lines)


def main() -> int:
    args = experiment_args(__doc__.splitlines()[0], "runs/memory")
    if not args.report_only:
        run_all(run_memory.jobs_for(args.seeds, args.out, MEMORIES), args.jobs)
    print(write_results(HERE, "experiments/memory/native_resolution.py", TITLE, report(args.out, args.seeds),
                        name="native_resolution.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
