"""Test-only fault injection at the run directory's write boundaries, loaded with --plugin.

``INCREMENTAL_TEST_KILL_AT_WRITE=EXPERIENCE:BOUNDARY`` SIGKILLs the process right after that
write of that experience (``tensorboard``, ``checkpoint``, ``model`` or ``metrics``: see
incremental.run.directory); ``INCREMENTAL_TEST_PAUSE_AT_WRITE=EXPERIENCE:BOUNDARY:FILE`` waits
there until FILE exists. Unset, it changes nothing, so a resumed run may load it too."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from incremental.run.directory import RunDirectory

KILL_AT = "INCREMENTAL_TEST_KILL_AT_WRITE"
PAUSE_AT = "INCREMENTAL_TEST_PAUSE_AT_WRITE"
_original = RunDirectory.reached


def _reached(self: RunDirectory, boundary: str, experience: int) -> None:
    _original(self, boundary, experience)
    here = f"{experience}:{boundary}"
    if os.environ.get(KILL_AT) == here:
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_AT, "")
    if pause.startswith(here + ":"):
        release = Path(pause[len(here) + 1:])
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


RunDirectory.reached = _reached  # type: ignore[method-assign]
