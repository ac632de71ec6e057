"""Wall time per phase of an experience (training, a KD teacher's forward passes, balanced
finetuning, exemplar selection, compilation), measured without stalling a GPU.

A phase inside the training loop runs thousands of times; timing it with ``time.perf_counter``
would need a device sync each time. On CUDA each occurrence records a pair of CUDA events
instead, and the events are read once, when the experience's figures are collected.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Iterator

import torch


class PhaseTimes:
    """Seconds spent per named phase since the last :meth:`collect`."""

    def __init__(self, device: Any = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events[name].append((start, end))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - began

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] += seconds

    def collect(self) -> dict[str, float]:
        """The phases' seconds so far (one device sync on CUDA), and start again."""
        if self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                self._seconds[name] += sum(start.elapsed_time(end) for start, end in pairs) / 1000
        seconds = {name: round(value, 6) for name, value in sorted(self._seconds.items())}
        self._seconds, self._events = defaultdict(float), defaultdict(list)
        return seconds


def phase(strategy: Any, name: str) -> contextlib.AbstractContextManager[Any]:
    """``with phase(strategy, "kd_teacher"):`` times the body into the run's PhaseTimes; a
    no-op under a template that has none (a plain Avalanche one)."""
    times = getattr(strategy, "phase_times", None)
    return times.phase(name) if times is not None else contextlib.nullcontext()
