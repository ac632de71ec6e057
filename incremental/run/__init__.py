"""Running a protocol: the run directory, resuming, the process environment and the loop."""

from .loop import run
from .results import RunResults, without_wall_clock

__all__ = ["RunResults", "run", "without_wall_clock"]
