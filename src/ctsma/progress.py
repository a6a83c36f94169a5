"""Progress on long work: a bar for people (tqdm, on stderr) and JSON lines for programs.

The Slicer modules run the command line in a background process and follow its progress
by reading the JSON-lines file named by ``--progress-jsonl`` (or ``CTSMA_PROGRESS_JSONL``):
one object per line, ``{"stage": str, "done": int, "total": int, "message": str, "time": float}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")

_jsonl_path: str | None = os.environ.get("CTSMA_PROGRESS_JSONL") or None
_quiet = False


def configure(jsonl_path: str | None = None, quiet: bool | None = None) -> None:
    """Set where machine-readable progress goes and whether bars are shown."""
    global _jsonl_path, _quiet
    if jsonl_path is not None:
        _jsonl_path = jsonl_path or None
    if quiet is not None:
        _quiet = quiet


def settings() -> tuple[str | None, bool]:
    """The current JSON-lines file (or None) and whether bars are hidden, e.g. to hand to worker processes."""
    return _jsonl_path, _quiet


def emit(stage: str, done: int, total: int, message: str = "", **extra) -> None:
    """Append one progress event to the JSON-lines file, if one is configured."""
    if not _jsonl_path:
        return
    rec = {"stage": stage, "done": int(done), "total": int(total), "message": message, "time": time.time()}
    rec.update(extra)
    with open(_jsonl_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def track(iterable: Iterable[T], stage: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar and JSON-lines events named ``stage``."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = 0
    emit(stage, 0, total)
    bar = tqdm(iterable, total=total or None, desc=stage, unit=unit, file=sys.stderr,
               disable=_quiet, dynamic_ncols=True, leave=False)
    for i, item in enumerate(bar, 1):
        yield item
        emit(stage, i, total)
    bar.close()


def step(stage: str, done: int, total: int, message: str) -> None:
    """One step of work done in a loop of its own: a status line for people and the JSON-lines event."""
    emit(stage, done, total, message)
    info(message)


def info(message: str) -> None:
    """A one-line status message for people (stderr), unless quiet."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)
