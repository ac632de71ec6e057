"""Writing files so that a kill or a failed write never leaves half a file behind.

Every file the toolkit writes goes through :func:`write_atomic`: the content goes to
``NAME.tmp`` next to the target, which is renamed over the target only once complete
(optionally flushed to disk first). A failed write (a full disk, a read-only or vanished
folder) removes the temporary file and raises :class:`WriteError`, a one-line UserError
naming the file, so the CLI reports it with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import UserError, first_line

TMP_SUFFIX = ".tmp"


class WriteError(UserError):
    """A file that could not be written: ``FILE: cannot write (reason)``."""

    def __init__(self, path: Path, exc: OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        code = errno.errorcode.get(exc.errno or 0)
        super().__init__(f"cannot write ({reason}{', ' + code if code else ''})", source=str(path))
        self.path = path
        self.errno = exc.errno


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not possible on every platform; the rename
    is atomic either way)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], *, durable: bool = False) -> None:
    """``write(tmp_path)`` fills a temporary file, which then replaces ``path`` in one rename.
    ``durable``: flushed to disk before the rename, and the rename flushed after, so the file
    survives a power cut too (the checkpoint). Any OSError becomes a WriteError naming ``path``,
    with the temporary file removed."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        # the mode a plain open() gives (0644 under the usual umask), whatever the writer used:
        # some libraries create their files 0600
        os.chmod(tmp, 0o666 & ~current_umask())
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(path, exc) from None
    if durable:
        fsync_dir(path.parent)


@functools.cache
def current_umask() -> int:
    """The process's umask, read once: reading it means setting it, which is process-wide, so
    it is not done on every write while other threads may be creating files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def append_line(path: Path, line: str) -> None:
    """One line added to a log file (``resume.log``); a failure is a WriteError."""
    try:
        with open(path, "a", encoding="utf-8") as log:
            log.write(line.rstrip("\n") + "\n")
    except OSError as exc:
        raise WriteError(path, exc) from None


def remove_temporary_files(folder: Path) -> list[Path]:
    """Delete ``*.tmp`` leftovers of writes a kill interrupted (in ``folder`` and one level down)."""
    removed = []
    for pattern in (f"*{TMP_SUFFIX}", f"*/*{TMP_SUFFIX}"):
        for tmp in folder.glob(pattern):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def load_weights_only(path: Path, *, key: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, as one line: a file that holds pickled
    objects (which could run code) is refused naming the first global it would import, a corrupt
    one says what broke; torch's own text and warnings go to ``--verbose`` (the error's detail)."""
    import pickle
    import re
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # e.g. "Detected pickle protocol 4": kept for --verbose
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{path} does not exist", key=key) from None
        except pickle.UnpicklingError as exc:
            detail = "\n".join([*(str(w.message) for w in caught), str(exc)])
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"it would import {found.group(1)}" if found else "its pickle has instructions torch refuses"
            raise UserError(f"{path} holds objects, not just tensors, and was refused unread ({what}; "
                            f"torch.load(weights_only=True))", key=key, detail=detail) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            first = first_line(exc, "truncated")[:160]
            raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {first})", key=key,
                            detail=str(exc)) from None
