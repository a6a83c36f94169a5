"""Atomic writing of a report's files, all or nothing."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Mapping

from ..io import atomic_path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_outputs(files: Mapping[Path, bytes]) -> None:
    """Write every file atomically; if one fails, remove the ones this call already wrote.

    The content is rendered before this is called, so a rendering error never touches the disk;
    this guards the remaining case of a failure between two renames (disk full, permissions).
    """
    done: list[Path] = []
    try:
        for path, data in files.items():
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(data)
                os.chmod(tmp, 0o666 & ~_umask())  # reports are for sharing; mkstemp makes them private
            done.append(Path(path))
    except BaseException:
        for p in done:
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise
