"""Writes that never leave a half-written file where a good one was."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from compress.errors import CompressError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        os.chmod(tmp, usual_file_mode())  # mkstemp makes 0600
        replace_or_explain(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temporary_beside(path: Path, option: str = "") -> Path:
    """A new empty file in ``path``'s directory (so that a rename onto ``path`` is atomic);
    a directory that cannot take it is a user error, found before any long work."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        label = f"{option} {path}" if option else str(path)
        raise CompressError(f"cannot write {label}: {path.parent} does not take new files "
                            f"({exc.strerror})") from None
    os.close(fd)
    return Path(name)


def replace_or_explain(tmp: Path, path: Path, option: str = "") -> None:
    """Rename ``tmp`` onto ``path``; a refusal (an immutable or busy file) is one line."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        label = f"{option} {path}" if option else str(path)
        raise CompressError(f"cannot replace {label}: {exc.strerror}") from None


def usual_file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def regular_file_size(path: str | Path, max_mb: float, what: str, name: str | None = None) -> int:
    """The size of ``path``, refused in one line unless it is a regular file of at most
    ``max_mb`` MiB: a FIFO or a device would hang or never end a read, and a file past any
    plausible size is not what it claims to be. ``name``: how messages call the file."""
    path = Path(path)
    name = name or str(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise CompressError(f"cannot read {name}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CompressError(f"{name} is not a regular file, so it cannot be {what}")
    if info.st_size > max_mb * 2**20:
        raise CompressError(f"{name} is {info.st_size / 2**20:,.1f} MiB, more than {what} "
                            f"may be ({max_mb:,g} MiB)")
    return info.st_size
