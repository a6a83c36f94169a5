"""Run the ``ctsma`` command line in a background process and follow it.

The Slicer modules never run the science in Slicer's own process: the Logic starts
``[python, -m, ctsma.cli.main, --progress-jsonl, FILE, <subcommand>, ...]`` (an argument list,
never a shell string), follows progress by tailing the JSON-lines file that
:mod:`ctsma.progress` appends to, and can cancel (terminate the whole process group, then kill
it after a grace period). Polling is non-blocking: the Widget calls :meth:`ProcessRunner.poll`
from a ``QTimer``; batch code calls :meth:`ProcessRunner.wait`. Nothing here imports Qt.

Hand-written rather than QProcess so that it runs (and is tested) without Qt, and so that
cancelling also stops the worker processes that the command line may start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
_BAR = re.compile(r"\d+%\|")  # a tqdm progress-bar line, not an error message


@dataclass
class ProgressEvent:
    """One line of the ``--progress-jsonl`` file."""

    stage: str
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total > 0 else None


@dataclass
class RunStatus:
    """Where a run stands: ``state`` is running, done, failed or cancelled."""

    state: str
    returncode: int | None = None
    stage: str = ""
    fraction: float | None = None
    message: str = ""
    last_error: str = ""
    events: list[ProgressEvent] = field(default_factory=list)
    warning: str = ""  # a run that finished with its outputs but something to tell (e.g. a failed QA)

    @property
    def finished(self) -> bool:
        return self.state != RUNNING


def python_executable() -> str:
    """The Python that runs ``ctsma``: PythonSlicer inside Slicer, else this interpreter."""
    try:
        from slicer import app  # noqa: F401  (only inside the Slicer application)
    except ImportError:
        return sys.executable
    return shutil.which("PythonSlicer") or sys.executable


def ctsma_command(args: list[str], progress_file: str | os.PathLike, python: str | None = None) -> list[str]:
    """The argument list that runs ``ctsma <args>`` with machine-readable progress."""
    if isinstance(args, str):
        raise TypeError("pass the ctsma arguments as a list, not a shell string")
    return [python or python_executable(), "-m", "ctsma.cli.main", "--progress-jsonl", str(progress_file),
            *map(str, args)]


class ProcessRunner:
    """Starts one command, tails its progress file, reports done/failed/cancelled.

    ``env`` entries are added to the current environment; ``pythonpath`` entries are put in
    front of ``PYTHONPATH`` (used so the child finds the ``ctsma`` package installed beside
    the Slicer modules).
    """

    def __init__(self, env: dict[str, str] | None = None, pythonpath: list[str] | None = None,
                 grace_s: float = 5.0):
        self.env = dict(env or {})
        self.pythonpath = [str(p) for p in (pythonpath or [])]
        self.grace_s = grace_s
        self.process: subprocess.Popen | None = None
        self.progress_file: Path | None = None
        self.log_file: Path | None = None
        self._offset = 0
        self._partial = ""
        self._events: list[ProgressEvent] = []
        self._cancelled = False
        self._log_handle = None

    # -- starting -------------------------------------------------------------------------
    def start(self, command: list[str], work_dir: str | os.PathLike, progress_file: str | os.PathLike | None = None,
              env: dict[str, str] | None = None):
        """Start ``command`` (an argument list) with stdout+stderr going to ``work_dir/run.log``."""
        if isinstance(command, str):
            raise TypeError("pass the command as an argument list, not a shell string")
        if self.is_running():
            raise RuntimeError("a process is already running: cancel it or wait for it first")
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        self.progress_file = Path(progress_file) if progress_file else work_dir / "progress.jsonl"
        self.log_file = work_dir / "run.log"
        self._offset, self._partial, self._events, self._cancelled = 0, "", [], False
        env = {**os.environ, **self.env, **(env or {})}
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_handle = open(self.log_file, "wb")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group, so cancel reaches its children
        self.process = subprocess.Popen(list(map(str, command)), cwd=str(work_dir), env=env,
                                        stdin=subprocess.DEVNULL, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, **kwargs)
        return self

    def start_ctsma(self, args: list[str], work_dir: str | os.PathLike, env: dict[str, str] | None = None,
                    python: str | None = None, wrapper=None):
        """Start ``ctsma <args>`` in ``work_dir`` (progress in ``work_dir/progress.jsonl``).

        ``python`` picks another interpreter (a user's environment); ``wrapper(command) -> command``
        turns the argument list into another one (a cluster or remote template)."""
        progress = Path(work_dir) / "progress.jsonl"
        command = ctsma_command(args, progress, python)
        if wrapper is not None:
            command = list(wrapper(command))
        return self.start(command, work_dir, progress, env=env)

    # -- following ------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _read_events(self) -> None:
        if self.progress_file is None or not self.progress_file.exists():
            return
        with open(self.progress_file, "r", encoding="utf-8", errors="replace") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
            self._offset = fh.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                self._events.append(ProgressEvent(str(rec.get("stage", "")), int(rec.get("done", 0)),
                                                  int(rec.get("total", 0)), str(rec.get("message", ""))))
            except (ValueError, TypeError, AttributeError):
                continue  # a foreign or damaged line is skipped, not fatal

    def last_error_line(self) -> str:
        """The most telling line of the log: the last one mentioning an error, else the last one."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        text = self.log_file.read_bytes()[-65536:].decode("utf-8", errors="replace")
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip() and not _BAR.search(ln)]
        for line in reversed(lines):
            if "error" in line.lower():
                return line
        return lines[-1] if lines else ""

    def poll(self) -> RunStatus:
        """Non-blocking: read new progress lines and report the state."""
        if self.process is None:
            raise RuntimeError("nothing was started")
        self._read_events()
        rc = self.process.poll()
        if rc is None:
            state = RUNNING
        else:
            self._close_log()
            self._read_events()
            state = CANCELLED if self._cancelled else (DONE if rc == 0 else FAILED)
        last = self._events[-1] if self._events else None
        return RunStatus(state=state, returncode=rc, stage=last.stage if last else "",
                         fraction=last.fraction if last else None, message=last.message if last else "",
                         last_error=self.last_error_line() if state == FAILED else "",
                         events=list(self._events))

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> RunStatus:
        """Block until the process ends (or ``timeout`` seconds pass) and return the status."""
        end = None if timeout is None else time.monotonic() + timeout
        status = self.poll()
        while not status.finished and (end is None or time.monotonic() < end):
            time.sleep(interval)
            status = self.poll()
        return status

    # -- stopping -------------------------------------------------------------------------
    def cancel(self) -> RunStatus:
        """Terminate the process group, kill it after ``grace_s`` seconds, and return the status."""
        if self.process is None:
            raise RuntimeError("nothing was started")
        if self.process.poll() is None:
            self._cancelled = True
            self._signal(terminate=True)
            try:
                self.process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self._signal(terminate=False)
                self.process.wait()
        return self.poll()

    def _signal(self, terminate: bool) -> None:
        if os.name == "nt":
            if terminate:
                self.process.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                self.process.kill()
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __del__(self):  # never leave a worker behind when the Logic goes away
        try:
            if self.is_running():
                self.cancel()
            self._close_log()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
