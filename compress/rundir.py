"""A run directory: checkpoint, resolved recipe, metrics.jsonl, report.md and plots.

An existing directory is never overwritten: it must be empty, or be resumed. A run holds
a lock on its directory while it writes there: a second run (or a ``--resume``) into the
same ``--out`` is refused instead of mixing two runs' checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import weakref
from pathlib import Path

from compress.checkpoint import CHECKPOINT_NAME
from compress.errors import CompressError
from compress.fileio import atomic_write_text
from compress.jsontext import read_json

METRICS_NAME = "metrics.jsonl"
RECIPE_NAME = "recipe.yaml"
REPORT_NAME = "report.md"
RUN_FILES = frozenset({CHECKPOINT_NAME, METRICS_NAME, RECIPE_NAME, REPORT_NAME})


class RunDir:
    """``writer=False`` (torchrun ranks other than 0) reads the directory but never writes:
    creating, logging and writing files do nothing there."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.created_here = False
        self._made: list[Path] = []  # parents `create` made for the directory
        self._lock: int | None = None  # the directory's descriptor, flock-ed while writing

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_NAME

    def create(self, resumable: bool = True, restartable: bool = False) -> RunDir:
        """Make a fresh run directory, refusing to clobber anything already there; a
        ``restartable`` run (one that is never resumed: a prune) starts over in a directory
        that holds only an unfinished run's files (see `clear_unfinished`)."""
        if not self.writer:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise CompressError(f"--out {self.path} exists and is not a directory")
        if restartable and self.path.is_dir() and self.holds_only_an_unfinished_run():
            self.lock()
            self.clear_unfinished()
        if self.path.is_dir() and any(self.path.iterdir()):
            hint = " or pass --resume to continue that run" if resumable and \
                self.checkpoint.exists() else \
                " or pass --resume to start that run again (it stopped before its first " \
                "epoch ended)" if resumable and self.stopped_before_first_epoch() else ""
            raise CompressError(f"--out {self.path} already holds files; choose a new "
                                f"directory{hint}")
        self.created_here = not self.path.exists()
        self._made = self._missing_ancestors()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CompressError(f"cannot create --out {self.path}: {exc.strerror}") from None
        self.check_writable()
        self.lock()
        return self

    def holds_only_an_unfinished_run(self) -> bool:
        """Every entry is a file a run writes, and the run never logged its end."""
        entries = {entry.name for entry in self.path.iterdir()}
        if not entries or not entries <= RUN_FILES or not self.metrics.is_file():
            return False
        try:
            return all(event.get("event") != "final" for event in self.read_events())
        except (OSError, UnicodeDecodeError):
            return False

    def clear_unfinished(self) -> None:
        """Remove an unfinished run's files, to run it again in the same directory."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)

    def lock(self) -> None:
        """Hold an exclusive lock on the directory until this process ends (or `unlock`);
        refused in one line while another process holds it."""
        if not self.writer or self._lock is not None:
            return
        descriptor = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise CompressError(f"--out {self.path} is in use by another compress run; wait "
                                "for it to end or choose another directory") from None
        self._lock = descriptor
        self._release = weakref.finalize(self, os.close, descriptor)  # if never unlocked

    def unlock(self) -> None:
        """Let another run use the directory (this one has finished writing)."""
        if self._lock is not None:
            self._release()
            self._lock = None

    def _missing_ancestors(self) -> list[Path]:
        """The parents of the run directory that do not exist yet, nearest first."""
        missing = []
        for parent in self.path.absolute().parents:
            if parent.exists():
                break
            missing.append(parent)
        return missing

    def discard_if_unused(self) -> None:
        """Remove the directory again if this run made it and wrote nothing into it, and
        the parents it made for it (``runs/`` of a first refused run)."""
        if self.created_here and self.path.is_dir() and not any(self.path.iterdir()):
            self.unlock()
            self.path.rmdir()
            for parent in self._made:
                try:
                    parent.rmdir()
                except OSError:  # something else was put there meanwhile
                    break

    @contextlib.contextmanager
    def discarded_unless_checkpointed(self):
        """On any exit by exception (Ctrl-C included), remove what the run wrote if it has
        no checkpoint yet, so that the same --out works next time."""
        try:
            yield self
        except BaseException:
            self.discard_unless_checkpointed()
            raise

    def discard_unless_checkpointed(self) -> None:
        """Remove what a run wrote when it stopped before its first checkpoint."""
        if not self.writer or self.checkpoint.exists() or not self.path.is_dir():
            return
        for name in (RECIPE_NAME, METRICS_NAME):
            (self.path / name).unlink(missing_ok=True)
        self.discard_if_unused()

    def check_writable(self) -> None:
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise CompressError(f"--out {self.path} is not writable")

    def stopped_before_first_epoch(self) -> bool:
        """A train-prune run interrupted before any checkpoint: its recipe, no weights."""
        return self.recipe.is_file() and not self.checkpoint.exists()

    def restart(self) -> RunDir:
        """Empty a run that stopped before its first epoch, keeping its recipe."""
        self.check_writable()
        self.lock()
        if self.writer:
            for path in self.path.iterdir():
                if path != self.recipe and path.is_file():
                    path.unlink()
        return self

    def for_resume(self) -> RunDir:
        if not self.checkpoint.exists():
            raise CompressError(f"--resume: {self.path} holds no {CHECKPOINT_NAME} to resume")
        self.check_writable()
        self.lock()
        return self

    def log(self, event: str, **fields) -> None:
        if not self.writer:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")

    def keep_events_through_epoch(self, epoch: int) -> None:
        """Drop the metrics logged after ``epoch`` ended (a resumed run redoes them)."""
        if not self.writer or not self.metrics.exists():
            return
        lines = self.metrics.read_text().splitlines(keepends=True)
        cut = 0
        for i, line in enumerate(lines):
            try:
                event = read_json(line, "a line of metrics.jsonl")
            except CompressError:
                continue
            if isinstance(event, dict) and event.get("event") == "epoch" and \
                    event.get("epoch") == epoch:
                cut = i + 1
        if cut < len(lines):
            atomic_write_text(self.metrics, "".join(lines[:cut]))

    def write_text(self, name: str, text: str) -> None:
        if not self.writer:
            return
        atomic_write_text(self.path / name, text)

    def read_events(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        events = []
        for line in self.metrics.read_text().splitlines():
            try:
                event = read_json(line, "a line of metrics.jsonl")
            except CompressError:
                continue  # a line cut short by a crash, or past the limits of JSON read
            if isinstance(event, dict):
                events.append(event)
        return events


def new_run_name(*parts: str) -> str:
    """A fresh default run directory, ``runs/<parts>-<time>``, so running the same command
    again never collides with the last run (a second within the same second gets -2, ...)."""
    import time

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise CompressError("under torchrun every process must write the same run: name it "
                            "with --out RUN")
    stem = "-".join(p.replace(":", "_").replace("/", "_") for p in parts)
    base = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, count = base, 1
    while Path(name).exists():
        count += 1
        name = f"{base}-{count}"
    return name
