"""Atomic output: every file is written under a temporary name and renamed into place.

A reader therefore sees either the previous file or the complete new one, never a
half-written file, even when the writer is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from glob import escape as glob_escape
from typing import Any, Iterator

import numpy as np

from ..errors import UserError

_MULTI_SUFFIXES = (".nii.gz", ".seg.nrrd", ".tar.gz")


def _split_suffix(name: str) -> tuple[str, str]:
    for s in _MULTI_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)], s
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext) if dot and stem else (name, "")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path.parent}: {exc.strerror or exc}") from None


def _not_a_folder(path: Path) -> Path:
    if path.is_dir():
        raise UserError(f"output {path} is a folder; give a file name")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension); rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = _not_a_folder(Path(path))
    _make_parent(path)
    stem, suffix = _split_suffix(path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{suffix}", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files: give the result the permissions of a normal file
            os.chmod(tmp_path, 0o666 & ~_umask())
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def remove_stale_partials(path: str | os.PathLike) -> None:
    """Delete the temporary files that an interrupted :func:`atomic_path` write of ``path`` left beside it (a
    SIGKILL gives it no chance to clean up). Call it before rewriting ``path`` in a resumed run that is the
    only writer of ``path``."""
    path = Path(path)
    stem, suffix = _split_suffix(path.name)
    for left in path.parent.glob(f".{glob_escape(stem)}.*.partial{glob_escape(suffix)}"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            left.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` when the block succeeds.

    Use for outputs made of several files that only make sense together.
    """
    path = Path(path)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders: give the result a normal folder's permissions
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise UserError(f"{path} already exists")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and paths to JSON types; NaN and inf become ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (no NaN literals), atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return write_text(path, text + "\n")


def merge_json(path: str | os.PathLike, update: dict, *, drop=()) -> Path:
    """Merge ``update`` into the JSON object at ``path`` (keys in ``drop`` removed first; a missing or unreadable
    file counts as empty) and write it atomically: commands that share a ``metrics.json`` keep each other's
    blocks."""
    path = Path(path)
    merged = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            merged = old if isinstance(old, dict) else {}
        except (ValueError, UnicodeDecodeError):
            merged = {}
    for k in drop:
        merged.pop(k, None)
    merged.update(update)
    return write_json(path, merged)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # before mkdir, whose error would say only "File exists"
        raise UserError(f"output path {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise UserError(f"output path {path} exists and is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ctsma-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"output folder {path} is not writable: {exc.strerror or exc}") from None
    return path


def ensure_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> Path:
    """Check, before any work, that a result file can be written at ``path``: not a folder, a writable parent
    folder (created if needed) and, with ``suffixes``, one of those endings."""
    path = Path(path)
    if suffixes and not any(path.name.lower().endswith(s) for s in suffixes):
        raise UserError(f"output {path}: the file name must end with {' or '.join(suffixes)}")
    ensure_writable_dir(_not_a_folder(path).parent)
    return path


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and refuse any result that escapes ``root``.

    Subject names and other strings from manifests go into output paths; this keeps
    ``../`` or absolute names from writing outside the chosen output folder.
    """
    root_r = Path(root).resolve()
    target = root_r.joinpath(*parts).resolve()
    if target != root_r and root_r not in target.parents:
        raise UserError(f"refusing to write outside the output folder: {'/'.join(parts)!r}")
    return target


_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                    *(f"lpt{i}" for i in range(1, 10))}


def folder_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a folder on every system the outputs may be copied to, or None: a path part ('/',
    '\\', '.', '..'), a character or name that Windows refuses, or a trailing dot or space (which Windows drops)."""
    if name in (".", "..") or "/" in name or "\\" in name:
        return "no '/', '\\', '.' or '..'"
    if any(c in '<>:"|?*' or ord(c) < 32 for c in name):
        return 'no <>:"|?* or control characters'
    if name.split(".")[0].casefold() in _WINDOWS_DEVICES:
        return "a device name on Windows"
    if name.endswith((".", " ")):
        return "no trailing dot or space"
    return None


STAGING_PREFIX = ".staging-"
COMPLETION_MARKER = "summary.json"   # written last by staged_outputs: its presence means the folder is complete
_STAGING_NAME = re.compile(r"^\.staging-(\d+)@(.+)\.[A-Za-z0-9_]+$")


def _staging_prefix() -> str:
    """``.staging-<pid>@<host>.``: whose staging folder it is, so that only a dead run's folder is ever removed."""
    return f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}."


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs. On Windows ``os.kill(pid, 0)`` would terminate the
    process, so there every run counts as alive and staging folders are never removed."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(out_dir: str | os.PathLike) -> None:
    """Delete the staging folders that killed :func:`staged_outputs` runs left in ``out_dir`` (SIGKILL gives them no
    chance to clean up): those whose run, named in the folder, was on this machine and is no longer alive. Folders
    of live runs, of other machines (a shared file system) and any other name are left alone."""
    host = socket.gethostname()
    for left in Path(out_dir).glob(f"{STAGING_PREFIX}*"):
        m = _STAGING_NAME.match(left.name)
        if (m and m.group(2) == host and not pid_alive(int(m.group(1))) and left.is_dir()
                and not left.is_symlink()):
            shutil.rmtree(left, ignore_errors=True)


def remove_stale_outputs(out_dir: str | os.PathLike, owned, produced) -> list[str]:
    """Remove from ``out_dir`` the files among ``owned`` (relative names of what this command can write) that this
    run did not write (``produced``): a rerun into the folder of an earlier run with other options (or another
    image) must not leave that run's files beside its own. Other files (a user's) are never touched. Returns the
    names removed."""
    out, gone = Path(out_dir), []
    for name in sorted(set(owned) - set(produced)):
        p = out / name
        if p.is_file():
            p.unlink()
            gone.append(name)
    for name in gone:  # a sub-folder the earlier run made for them (maps/), when nothing else is left in it
        if (out / name).parent != out:
            with contextlib.suppress(OSError):
                (out / name).parent.rmdir()
    return gone


def remove_other_shard_layouts(out_dir: str | os.PathLike, prefix: str, suffix: str, n: int, what: str) -> list[str]:
    """Remove from ``out_dir``, and say so, the per-shard files ``<prefix><i>of<N><suffix>`` (``what``: a batch's
    status files, a cohort's summaries) of a run split into another number of shards than ``n``: after ``--shard
    1/2`` and then ``--shard 1/3`` the old split's files stayed beside the new one's, and no one could tell which
    were current (the old split's rows are the new one's, in other shards). The files of split ``n`` stay: its
    shards run at the same time (a cluster job array), each writing its own. Other files, and links, are never
    touched. Returns the names removed."""
    from .. import progress

    name = re.compile(re.escape(prefix) + r"(\d+)of(\d+)" + re.escape(suffix))
    gone = []
    for f in sorted(Path(out_dir).glob(f"{glob_escape(prefix)}*of*{glob_escape(suffix)}")):
        m = name.fullmatch(f.name)
        if m and int(m.group(2)) != n and f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)  # (another shard of split n may have removed it first)
            gone.append(f.name)
    if gone:
        progress.info(f"removed the {what} of an earlier --shard layout ({', '.join(gone)}) from {out_dir}; this run "
                      f"is split into {n} shard{'s' if n > 1 else ''}, {prefix}<i>of{n}{suffix}")
    return gone


def existing_file(path, what: str, error=UserError) -> Path:
    """``path`` as a Path when it names a file; otherwise ``error`` saying that nothing, or a folder, is there (a
    manifest given as its cohort's folder was "not found")."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} {p} is a folder; give the file itself")
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    return p


def input_stamp(path) -> dict | None:
    """Size and modification time of an input (a folder, e.g. a DICOM series: of all its files): a resumed batch
    compares them too, so that a scan re-exported or corrected at the same path is redone, not kept. None when
    ``path`` is empty or names nothing."""
    if not path:
        return None
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not _junk(f.name)) \
        if p.is_dir() else []
    if not files:
        return None
    stats = [f.stat() for f in files]
    return {"bytes": sum(st.st_size for st in stats), "mtime_ns": max(st.st_mtime_ns for st in stats),
            "files": len(files)}


def content_sha256(path) -> str | None:
    """SHA-256 of a file's bytes: the stamp of an input whose replacement must be caught whatever its size and time
    (a model file copied over another of the same size with ``cp -p`` or ``rsync -t``), and small enough to read
    whole (a model file: milliseconds). None when ``path`` is empty or names no file."""
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _junk(name: str) -> bool:
    """Files a file manager or another system puts in a folder, which no reader uses: hidden files (.DS_Store),
    Thumbs.db, desktop.ini."""
    return name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini")


def same_request(recorded: dict | None, request: dict, legacy: dict | None = None) -> bool:
    """Whether a finished run's recorded request is ``request``. A record from before input stamps were recorded
    (no ``stamps``) is compared without them, and the stamps only where both have them: one from before a stamp was
    added (the diagnosis model's checksum) is compared without that stamp, so an upgrade does not redo every
    finished case. ``legacy``: the stamps, as they are now, that an earlier version made and this one no longer
    makes (the diagnosis model's size and time, ``input_stamp``): a record holding one is compared by it, so that an
    input changed since that version wrote the record is still caught."""
    if recorded is None:
        return False
    if "stamps" not in recorded:
        request = {k: v for k, v in request.items() if k != "stamps"}
    elif isinstance(recorded["stamps"], dict) and isinstance(request.get("stamps"), dict):
        now = {**{k: v for k, v in (legacy or {}).items() if k not in request["stamps"]}, **request["stamps"]}
        both = recorded["stamps"].keys() & now.keys()
        recorded = {**recorded, "stamps": {k: v for k, v in recorded["stamps"].items() if k in both}}
        request = {**request, "stamps": {k: v for k, v in now.items() if k in both}}
    return recorded == request


def recorded_request(marker: str | os.PathLike) -> dict | None:
    """The ``request`` a finished run recorded in its completion marker (``infer``'s ``summary.json``, a
    registration's ``qa.json``), as JSON types: a resumed batch compares it with what it is asked now, made JSON
    with :func:`to_jsonable`. None when the marker is missing, unreadable or from a version that recorded none
    (such a case is redone)."""
    try:
        return json.loads(Path(marker).read_text(encoding="utf-8")).get("request")
    except (OSError, ValueError, AttributeError):
        return None


def check_no_obstacle(out: Path, *names: str | os.PathLike) -> None:
    """Refuse, in one line, an output name (relative to ``out``) that a folder of that name (or a file named as one
    of its folders) already holds in ``out``: moving the run's file there would fail half-way through the moves. A
    command whose work is long calls it for the names it will write before the work, as :func:`staged_outputs`
    does before moving."""
    for rel in map(Path, names):
        for i in range(1, len(rel.parts)):
            part = out.joinpath(*rel.parts[:i])
            if part.exists() and not part.is_dir():
                raise UserError(f"cannot write {out / rel}: {part} is a file, not a folder; move it away or choose "
                                "another output folder")
        if (out / rel).is_dir():
            raise UserError(f"cannot write {out / rel}: a folder of that name is in the way; move it away or choose "
                            "another output folder")


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike, marker: str = COMPLETION_MARKER) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out_dir``; on success move its files into ``out_dir``.

    Unlike :func:`atomic_dir`, files already in ``out_dir`` that the run does not produce are kept
    (a user's own files are never deleted). On an exception nothing of the run is left behind. The completion
    ``marker`` (default :data:`COMPLETION_MARKER`, ``summary.json`` of ``ctsma infer``; ``qa.json`` of a
    registration) is moved last, and an older one is
    removed before the first move, so a run killed while the files are being moved never leaves a folder that
    looks complete; staging folders of killed runs on this machine are removed first.
    """
    out = ensure_writable_dir(out_dir)
    remove_stale_staging(out)
    stage = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=out))
    try:
        yield stage
        files = sorted((p for p in stage.rglob("*") if p.is_file()),
                       key=lambda p: (p.relative_to(stage) == Path(marker), str(p)))
        # before the first move: a refusal leaves the folder as it was
        check_no_obstacle(out, *(src.relative_to(stage) for src in files))
        if (stage / marker).is_file():
            with contextlib.suppress(FileNotFoundError):
                (out / marker).unlink()   # a rerun into a finished folder: incomplete until it ends
        for src in files:
            dst = out / src.relative_to(stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
