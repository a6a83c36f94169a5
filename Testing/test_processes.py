"""Independent jobs in spawned processes (ctsma.processes): results in order, side by side, errors stop the rest."""

from __future__ import annotations

import os
import time

import pytest

from ctsma.errors import UserError
from ctsma.processes import run_jobs


_STATE = {"mark": None}


def _mark():
    return _STATE["mark"]


def _job(i, seconds, fail=False):
    if fail:
        raise UserError(f"job {i} failed")
    start = time.time()
    time.sleep(seconds)
    return {"i": i, "pid": os.getpid(), "start": start, "end": time.time()}


def test_jobs_run_side_by_side_and_come_back_in_order():
    seen = []
    out = run_jobs(_job, [(i, 0.8 if i < 2 else 0.1) for i in range(5)], 2, on_done=lambda i, r: seen.append(i))
    assert [r["i"] for r in out] == list(range(5))
    assert sorted(seen) == list(range(5))
    assert len({r["pid"] for r in out}) == 2 and os.getpid() not in {r["pid"] for r in out}
    assert out[1]["start"] < out[0]["end"]              # the two long jobs overlapped
    for r in out:                                        # never more than two at once
        assert sum(o["start"] <= r["start"] < o["end"] for o in out) <= 2


def test_one_worker_runs_in_this_process_and_a_failure_stops_the_others():
    import multiprocessing

    out = run_jobs(_job, [(0, 0.0), (1, 0.0)], 1)
    assert {r["pid"] for r in out} == {os.getpid()}
    t0 = time.time()
    with pytest.raises(UserError, match="job 1 failed"):
        run_jobs(_job, [(0, 0.2), (1, 0.0, True), (2, 30.0), (3, 30.0)], 2)
    assert time.time() - t0 < 15                         # the 30-s jobs were stopped, not waited for
    assert multiprocessing.active_children() == []


def _die():
    os._exit(3)


def test_a_worker_that_dies_gives_a_clear_error():
    with pytest.raises(UserError, match="worker process stopped before its work was done.*__main__"):
        run_jobs(_die, [(), ()], 2)


def test_workers_are_spawned_not_forked():
    """A forked worker inherits the caller's state (here a module global; in the demo on a GPU machine, the thread
    pools and CUDA context of the synthesis training, in which the registration's forked workers hung)."""
    _STATE["mark"] = "set in the parent"
    try:
        assert run_jobs(_mark, [(), ()], 2) == [None, None]
    finally:
        _STATE["mark"] = None


def test_the_package_starts_its_worker_processes_in_one_place():
    from pathlib import Path

    import ctsma

    root = Path(ctsma.__file__).parent
    users = sorted(str(f.relative_to(root)) for f in root.rglob("*.py")
                   if "ProcessPoolExecutor(" in f.read_text(encoding="utf-8"))
    assert users == ["processes.py"]


def _worker_settings():
    import warnings

    from ctsma import progress

    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("from a worker", UserWarning)
    return progress._quiet, progress._jsonl_path, len(caught)


def test_workers_start_with_the_callers_progress_and_warning_settings(tmp_path):
    """Forked workers inherited the caller's --quiet, --progress-jsonl and warning filters; spawned ones are given
    them."""
    import warnings

    from ctsma import progress

    old = progress._quiet, progress._jsonl_path
    try:
        progress.configure(jsonl_path=str(tmp_path / "p.jsonl"), quiet=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run_jobs(_worker_settings, [(), ()], 2)
        assert out == [(True, str(tmp_path / "p.jsonl"), 0)] * 2
        progress.configure(jsonl_path="", quiet=False)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # a warning class of the caller's script cannot be sent to a worker: that filter stays behind
            warnings.filterwarnings("ignore", category=type("ScriptWarning", (UserWarning,), {"__module__": "__main__"}))
            from ctsma.processes import worker_pool
            with worker_pool(1) as ex:
                assert ex.submit(_worker_settings).result() == (False, None, 1)
    finally:
        progress.configure(jsonl_path=old[1] or "", quiet=old[0])


def _warn_once(text: str) -> None:
    import warnings
    warnings.warn(text, UserWarning, stacklevel=1)


def test_workers_format_warnings_as_the_command_line_does(capfd):
    """A worker's warning came out in Python's 'file:line: UserWarning: ...' form with its source line, where the
    command line says 'warning: ...'; the workers now take the caller's format (one of the package's)."""
    import warnings

    from ctsma.cli.main import _format_warning
    from ctsma.processes import worker_pool

    old = warnings.formatwarning
    try:
        warnings.formatwarning = _format_warning
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with worker_pool(1) as ex:
                ex.submit(_warn_once, "the pairing registration is poor for K2").result()
    finally:
        warnings.formatwarning = old
    err = capfd.readouterr().err
    assert "warning: the pairing registration is poor for K2\n" in err and "UserWarning" not in err, err


_KILLED_CALLER = """
import os, sys, time
from ctsma.processes import worker_pool
if __name__ == "__main__":
    with worker_pool(1) as ex:
        print(ex.submit(os.getpid).result(), flush=True)
        time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie nobody reaps is gone too
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_end_when_their_caller_is_killed(tmp_path):
    """A caller killed by SIGKILL (kill -9 of 'ctsma phantom --workers 2', the OOM killer) cannot stop its pool:
    its idle workers waited for work forever, each holding its memory."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import ctsma

    script = tmp_path / "caller.py"
    script.write_text(_KILLED_CALLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ctsma.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(proc.stdout.readline())
        assert not _gone(worker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = not _gone(worker)
        if alive:
            os.kill(worker, signal.SIGKILL)
        assert not alive, "the worker outlived its killed caller"
    finally:
        proc.kill()
        proc.stdout.close()
