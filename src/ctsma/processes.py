"""Work shared out over spawned worker processes: :func:`worker_pool` and :func:`run_jobs`.

Used where a stage is many independent single-threaded (or thread-starved) jobs, such as the demo's CNN trainings
and the diagnosis cross-validations: two such jobs side by side on two cores take about half the time of one after
the other. Workers are spawned, not forked: a forked worker inherits the caller's memory and the state of its
thread pools (OpenMP, ITK, torch) and of a CUDA context, and can hang in it (the demo's registration stage did, on
a GPU machine, after the synthesis had trained on the GPU). A spawned worker starts with the caller's progress
settings (quiet or not, the JSON-lines file) and warning filters. The first job that fails stops the others (they
could run on for minutes) and its error is raised.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

from .errors import UserError

BROKEN = ("a worker process stopped before its work was done (killed, out of memory, or it could not start: a "
          "Python script that runs CT-SMA's parallel work must start it under `if __name__ == \"__main__\":`, "
          "because each worker imports the script)")


def _exit_with_parent(parent: int) -> None:
    """End this worker once the process that started it is gone. A caller killed by SIGKILL (the OOM killer, a
    cluster's hard limit, kill -9) cannot stop its pool, and its idle workers waited for work forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(quiet: bool, jsonl_path: str | None, filters: list, initializer: Callable[..., Any] | None,
                 initargs: tuple, parent: int | None = None, formatwarning: Callable[..., str] | None = None) -> None:
    import threading
    import warnings

    from . import progress

    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    progress.configure(jsonl_path=jsonl_path or "", quiet=quiet)
    warnings.filters[:] = filters
    getattr(warnings, "_filters_mutated", lambda: None)()  # CPython's cache of the filters
    if formatwarning is not None:  # the command line's one-line 'warning: ...', not Python's file:line form
        warnings.formatwarning = formatwarning
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def worker_pool(workers: int, quiet: bool = False, initializer: Callable[..., Any] | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` spawned processes; on any error inside the block its workers are terminated.

    The workers show progress as the caller does (no bars or status lines when it is quiet), write to its
    machine-readable progress file, if one is configured, and filter and format warnings as it does when the pool
    starts.
    ``quiet``: no bars or status lines in the workers either way (the caller reports the jobs as they finish).
    ``initializer(*initargs)`` runs once in each worker (a module-level function)."""
    import warnings

    from . import progress

    # a filter whose warning class lives in the caller's __main__ (a script, a notebook) cannot reach a worker
    filters = [f for f in warnings.filters if getattr(f[2], "__module__", "") != "__main__"]
    jsonl_path, caller_quiet = progress.settings()
    # the caller's warning format, where a worker can import it (not a script's or notebook's own function)
    fmt = warnings.formatwarning if getattr(warnings.formatwarning, "__module__", "").startswith("ctsma") else None
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(quiet or caller_quiet, jsonl_path, filters, initializer, initargs, os.getpid(),
                                       fmt))
    try:
        yield ex
    except BaseException as exc:
        procs = list((getattr(ex, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        ex.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 5
        for proc in procs:
            proc.join(5)
            # the pool's own thread may reap the process first, and until it records the exit code the process
            # still counts as alive (multiprocessing.active_children): wait for that too
            while proc.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.is_alive():  # deaf to SIGTERM for 5 s (a worker that handles it): not left running
                proc.kill()
        if isinstance(exc, BrokenProcessPool):
            raise UserError(BROKEN) from exc
        raise
    ex.shutdown()


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int,
             on_done: Callable[[int, Any], None] | None = None, quiet: bool = True) -> list:
    """``[fn(*job) for job in jobs]``, computed by ``workers`` spawned processes (in this process when ``workers``
    is 1 or there is one job). Jobs are started in the order given, so put the longest first. ``on_done(i,
    result)`` is called in this process as each job finishes. ``fn`` must be importable (a module-level function).
    ``quiet``: the workers show no progress (the caller reports the jobs as they finish); ``False`` lets each job
    report its own steps."""
    results: list = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            if on_done:
                on_done(i, results[i])
        return results
    with worker_pool(min(workers, len(jobs)), quiet=quiet) as ex:
        running = {ex.submit(fn, *job): i for i, job in enumerate(jobs)}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                results[i] = fut.result()  # a job's error stops the others here
                if on_done:
                    on_done(i, results[i])
    return results
