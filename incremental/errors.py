"""Errors meant for the user: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Sequence


class UserError(Exception):
    """A problem with the user's input, reported as ``SOURCE: key.path: problem``.

    ``source`` is the file (or ``--set``) the value came from; ``key`` is the dotted
    path inside the config. Both may be filled in later by whoever knows them, which
    is why they are plain attributes rather than baked into the message.
    """

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None,
                 detail: str | None = None):
        if "Original Traceback" in message:
            # Re-raised by torch from a DataLoader worker as ``type(msg)`` with the worker's
            # traceback in msg; its last line holds the original "key: problem".
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)
        self.message = message
        self.key = key
        self.source = source
        self.detail = detail  # the library's own text, printed under --verbose only

    def with_context(self, *, key: str | None = None, source: str | None = None) -> "UserError":
        if self.key is None and key is not None:
            self.key = key
        if self.source is None and source is not None:
            self.source = source
        return self

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        return ": ".join(parts + [self.message])


class Interrupted(UserError):
    """A run stopped on request (Ctrl-C, SIGTERM): one line saying what was kept, and the
    shell's exit code for the signal."""

    def __init__(self, message: str, *, exit_code: int = 130):
        super().__init__(message, source="")  # "": about no file, so no config file is named

        self.exit_code = exit_code


class RunsFailed(UserError):
    """Some runs of a parallel sweep failed (each in its own process; the rest completed):
    one line naming them and their logs, exit code 1 (the input was fine)."""

    exit_code = 1

    def __init__(self, message: str, run_dirs: Sequence[Any] = ()):
        super().__init__(message, source="")
        self.run_dirs = list(run_dirs)  # every run of the sweep, complete or not


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal lands; a BaseException, as Ctrl-C's is, so that no
    ``except Exception`` on the way swallows it."""


class ConfigError(UserError):
    """A config value that is unknown, of the wrong type, or out of range."""


class DataError(UserError):
    """A dataset folder or file that is missing, empty or unreadable."""


def first_line(exc: object, default: str = "") -> str:
    """The first line of ``str(exc)`` (a library's error, for a one-line message), or ``default``."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else default


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x' or 'y'?)`` or ``''`` when nothing is close."""
    matches = close_matches(word, candidates)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"
