"""Progress bars for every phase that can take more than a few seconds.

Training and evaluation have their tqdm bars (``plugins.ProgressBars``); the work around them
uses :func:`bar`: balanced finetuning, the probes, a GAN's and a NeRV's fitting. A command
silences them all with ``--quiet`` through :func:`shown`, as a non-zero torchrun rank does, so
code deep in a strategy needs no quiet flag of its own.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

_SHOWN: ContextVar[bool] = ContextVar("incremental_progress_shown", default=True)


@contextmanager
def shown(on: bool) -> Iterator[None]:
    """Bars opened inside this block are drawn only when ``on``."""
    token = _SHOWN.set(on)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def is_shown() -> bool:
    return _SHOWN.get()


def bar(total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar that disappears when done (``total=None``: a count with a rate), or a silent
    one under ``shown(False)``; use it as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=not is_shown())
