"""Atomic writing of a report's files, all or nothing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..io import ensure_output_file
from ..io.atomic import _umask


def write_outputs(files: Mapping[Path, bytes]) -> None:
    """Write every file, all or nothing: each is written in full under a temporary name first (a folder in the way,
    an unwritable place or a full disk stops the call before any target changes), then all are renamed into place;
    a failure among the renames puts the earlier versions back."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            path = ensure_output_file(path)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
                staged.append((Path(tmp), path))
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.chmod(tmp, 0o666 & ~_umask())  # reports are for sharing; mkstemp makes them private
            except OSError as exc:
                raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        backups: list[tuple[Path, Path]] = []
        moved: list[Path] = []
        try:
            for tmp, path in staged:
                if path.exists():
                    bak = path.with_name(f".{path.name}.bak-{os.getpid()}")
                    os.replace(path, bak)
                    backups.append((bak, path))
                os.replace(tmp, path)
                moved.append(path)
        except BaseException:
            for path in moved:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            for bak, path in backups:
                with contextlib.suppress(OSError):
                    os.replace(bak, path)
            raise
        for bak, _ in backups:
            with contextlib.suppress(OSError):
                os.unlink(bak)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
