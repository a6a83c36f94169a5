"""Cohort mode: register every MR/CT pair of a manifest, in parallel, resumable, shardable.

The manifest is a CSV with at least the columns ``mr`` and ``ct`` (paths relative to the CSV's
folder, like the phantom's ``manifest.csv``); ``subject``, ``ct_bones`` and ``mr_bones`` are used
when present. Each pair's outputs go to ``OUT/<subject>/``; a pair whose ``qa.json`` records the same
request (images, masks, preset and the synthesis model's checksum) is skipped, so a rerun resumes, and one whose
request changed is registered again. ``shard=(i, n)`` keeps rows ``i, i+n, i+2n, …`` (0-based),
so that a cluster job array can spread a cohort over machines; ``OUT/cohort_<i>of<n>.csv`` then
summarises that shard.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .. import progress
from ..errors import ConfigError, InputImageError, UserError
from ..io.atomic import (content_sha256, input_stamp, recorded_request, remove_other_shard_layouts,
                         safe_join, same_request, to_jsonable, write_text)
from ..io.tables import read_table
from ..processes import worker_pool

_WORKER: dict = {}


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` (0 ≤ i < N) → (i, N); ``None`` → (0, 1)."""
    if text is None:  # (an empty --shard, from an unset variable, is refused below: not the whole cohort)
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), not {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < N (shards are numbered from 0)")
    return i, n


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest with absolute image paths and a ``subject`` column (row number when absent); read, and its
    subject names checked, by :func:`ctsma.io.tables.read_table`."""
    df = read_table(path, "manifest", required=("mr", "ct"), subjects=True, error=InputImageError)
    path = Path(path)
    if "subject" not in df.columns:
        df["subject"] = [f"row{i:04d}" for i in range(len(df))]
    for col in ("mr", "ct"):
        empty = [str(v) for v, cell in zip(df["subject"], df[col]) if not cell]
        if empty:
            raise InputImageError(f"manifest {path.name}: the {col} column is empty for subject(s) "
                                  f"{', '.join(empty[:10])}")
    for col in ("mr", "ct", "ct_bones", "mr_bones", "transform_ct_to_mr", "landmarks"):
        if col in df.columns:
            df[col] = [str((path.parent / v).resolve()) if v else "" for v in df[col]]
    return df


def _init_worker(model_path: str | None, threads: int) -> None:
    import SimpleITK as sitk
    import torch

    from ..synthesis.model import SynthesisModel

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    torch.set_num_threads(max(1, threads))
    _WORKER["model"] = SynthesisModel.load(model_path) if model_path else None


OWNER_MARKER = ".ctsma-register"  # written into a folder before the first registration into it, never removed


def _check_not_foreign(out: Path) -> None:
    """Refuse an output folder holding a transform that no ``ctsma register`` run wrote (neither ``qa.json`` nor
    :data:`OWNER_MARKER` beside it), e.g. a phantom's true ``transform_ct_to_mr.h5``: the run would replace it.
    :func:`register_files` marks the folder before it moves its files in, so that a rerun killed while moving them
    (its ``qa.json`` removed first) is not refused afterwards."""
    if (out / "transform_ct_to_mr.h5").is_file() and not (out / "qa.json").is_file() \
            and not (out / OWNER_MARKER).is_file():
        raise UserError(f"{out} already holds a transform_ct_to_mr.h5 that no 'ctsma register' run wrote (there is "
                        "no qa.json beside it; the folder of a phantom knee or of your own data?); registering into "
                        "it would replace that file: choose another --out")


def register_files(mr_path: str, ct_path: str, out_dir: str | Path, *, preset, model=None,
                   ct_bones_path: str | None = None, mr_bones_path: str | None = None,
                   request: dict | None = None, report=None, model_path: str | None = None) -> dict:
    """Read, register and write one pair (the work of ``ctsma register MR CT``); returns its QA record, whose
    ``qa_problem`` says why the pair failed the QA (None when it passed). ``report(stage_record)`` is called
    as each stage ends. ``model_path``, the file ``model`` was loaded from, is recorded in ``inputs`` with the
    SHA-256 of its bytes (cohort mode records it in ``request``)."""
    from ..io.images import read_image
    from .pipeline import register, write_outputs
    from .qa import MIN_BONE_DICE, registration_qa_problem

    _check_not_foreign(Path(out_dir))
    mr = read_image(mr_path, what="MR")
    ct = read_image(ct_path, what="CT")
    ct_bones = mr_bones = None
    if ct_bones_path:
        from .masks import read_bone_labels
        ct_bones = read_bone_labels(ct_bones_path, ct)
    if mr_bones_path:
        from .masks import read_bone_labels
        mr_bones = read_bone_labels(mr_bones_path, mr, what="MR bone labels")
    result = register(mr, ct, preset=preset, ct_bones=ct_bones, synthesis=model, mr_bones=mr_bones, report=report)
    problem = registration_qa_problem({"bone_dice": result.bone_dice}, MIN_BONE_DICE)
    if problem:
        warnings.warn(f"{problem}: the bones do not overlap after registration, so this pair is not usable (check "
                      "both images' orientation in their headers, and that they show the same knee); the outputs are "
                      "written for inspection, and 'ctsma dataset build' leaves the pair out", stacklevel=2)
    # absolute, like the model's: a path relative to the folder the command ran in means nothing to a later reader
    extra = {"inputs": {"mr": str(Path(mr_path).resolve()), "ct": str(Path(ct_path).resolve()),
                        "stamps": {"mr": input_stamp(mr_path), "ct": input_stamp(ct_path)}}, "qa_problem": problem}
    if model_path:  # which synthesis model made the pseudo-CT (a file trained again at its path is another model)
        extra["inputs"]["synthesis_model"] = str(Path(model_path).resolve())
        extra["inputs"]["stamps"]["synthesis_model_sha256"] = content_sha256(model_path)
    if request is not None:
        extra["request"] = request
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / OWNER_MARKER).touch()
    return write_outputs(result, mr, ct, out_dir, extra_qa=extra)


def cohort_request(row: dict, preset, model_path: str | None, model_sha256: str | None = None) -> dict:
    """What registering one manifest row was asked to do (images, preset, synthesis model): a rerun skips a subject
    whose ``qa.json`` records the same request and redoes one made from other inputs or settings. The synthesis
    model (one file) is stamped by its bytes, so that one trained again at the same path, whatever its size and
    time, redoes the pairs (``model_sha256``: that stamp, computed once for all rows; by default here)."""
    from dataclasses import asdict, is_dataclass

    from ..pipeline import settings_hash

    inputs = ("mr", "ct", "ct_bones", "mr_bones")
    stamps = {k: input_stamp(row.get(k)) for k in inputs}
    stamps["synthesis_model_sha256"] = model_sha256 or content_sha256(model_path)
    return to_jsonable({**{k: row.get(k) or None for k in inputs}, "stamps": stamps,
                        "preset": getattr(preset, "name", None),
                        "preset_hash": settings_hash(asdict(preset) if is_dataclass(preset) else preset),
                        "synthesis_model": str(Path(model_path).resolve()) if model_path else None})


QA_FAILED = "qa failed"  # registered and written, but the bones do not overlap: not usable (registration/qa.py)
SUMMARY_COLUMNS = ["subject", "status", "seconds", "bone_dice_mean", "rejected_stages", "warnings", "error", "note"]


def _qa_record(qa: dict, subject: str, status: str, seconds: float, warnings_: int, note: str,
               error: str = "") -> dict:
    """A summary row from a pair's QA record (a pair failing the QA gets that status and its reason; a pair with no
    QA record, ``{}``, blanks)."""
    problem = qa.get("qa_problem")
    return {"subject": subject, "status": QA_FAILED if problem else status, "seconds": seconds,
            "bone_dice_mean": (qa.get("bone_dice") or {}).get("mean"),
            "rejected_stages": ";".join(s["name"] for s in qa.get("stages", []) if not s.get("kept", True)),
            "warnings": warnings_, "error": problem or error, "note": note}


def _run_one(row: dict, out_dir: str, preset, request: dict | None = None, note: str = "") -> dict:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qa = register_files(row["mr"], row["ct"], out_dir, preset=preset, model=_WORKER["model"],
                                ct_bones_path=row.get("ct_bones") or None, mr_bones_path=row.get("mr_bones") or None,
                                request=request)
        return _qa_record(qa, row["subject"], "done", round(time.perf_counter() - t0, 2), len(caught), note)
    except UserError as exc:
        return _qa_record({}, row["subject"], "failed", round(time.perf_counter() - t0, 2), 0, note, error=str(exc))


@dataclass
class Cohort:
    """One cohort for :func:`run_cohorts`: a manifest, its output folder, a preset, and which of its rows."""
    manifest: str | Path
    out: str | Path
    preset: Any
    shard: tuple[int, int] = (0, 1)
    limit: int | None = None


def run_cohort(manifest: str | Path, out: str | Path, *, preset, model_path: str | None = None,
               shard: tuple[int, int] = (0, 1), jobs: int = 1, limit: int | None = None) -> pd.DataFrame:
    """Register the manifest's pairs of one shard into ``out``; returns (and writes) the shard summary.

    With ``jobs`` > 1 the pairs are registered in spawned worker processes: a Python script that calls this must do
    so under ``if __name__ == "__main__":``, because each worker imports the script."""
    return run_cohorts([Cohort(manifest, out, preset, shard, limit)], model_path=model_path, jobs=jobs)[0]


def run_cohorts(cohorts: Sequence[Cohort], *, model_path: str | None = None, jobs: int = 1) -> list[pd.DataFrame]:
    """:func:`run_cohort` for several cohorts (e.g. one manifest under several presets) with one pool of workers:
    the pairs of all of them are registered in the order given (put the slowest cohort first), so no worker idles
    at the end of one cohort while the other finishes its last pair, and the workers start (and load the synthesis
    model) once. Each pair's result is that of :func:`run_cohort` with the same threads. Returns the summaries."""
    todo, records = [], []
    model_sha256 = content_sha256(model_path)  # once, not for every row
    for k, c in enumerate(cohorts):
        df = read_manifest(c.manifest)
        i, n = c.shard
        rows = df.iloc[i::n]
        if c.limit:
            rows = rows.iloc[:c.limit]
        out = Path(c.out)
        out.mkdir(parents=True, exist_ok=True)
        records.append([])
        for row in rows.to_dict("records"):
            target = safe_join(out, row["subject"])
            request = cohort_request(row, c.preset, model_path, model_sha256)
            note = ""
            if (target / "qa.json").is_file():
                recorded = recorded_request(target / "qa.json")
                if same_request(recorded, request) or _same_but_threads(recorded, target / "qa.json", row, c.preset,
                                                                        model_path, model_sha256):
                    # its QA as it was, not blanks
                    records[k].append(_qa_record(_read_qa(target / "qa.json"), row["subject"],
                                                 "skipped (done before)", 0.0, 0, ""))
                    continue
                note = ("redone: its earlier registration came from other images (or files changed since), preset "
                        "or synthesis model")
            todo.append((k, len(records[k]), row, str(target), c.preset, request, note))
            records[k].append(None)
    for c in cohorts:  # once every manifest was read: a refused one leaves the earlier summaries
        remove_other_shard_layouts(c.out, "cohort_", ".csv", c.shard[1], "summaries")  # of another --shard split
    jobs = max(1, min(jobs, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def write_summaries() -> list[pd.DataFrame]:
        """This run's summaries as they stand, the pairs it has not reached marked so: written before the first pair
        and after each, so that even a killed run (SIGKILL) leaves no earlier run's summary of its shard."""
        stopped = {(k, j): row["subject"] for k, j, row, *_rest in todo if records[k][j] is None}
        out = []
        for k, (c, recs) in enumerate(zip(cohorts, records)):
            rows = [r if r is not None else _qa_record({}, stopped[k, j], "not run (the run stopped)", 0.0, 0, "")
                    for j, r in enumerate(recs)]
            out.append(pd.DataFrame(rows, columns=SUMMARY_COLUMNS))
            i, n = c.shard
            write_text(Path(c.out) / f"cohort_{i}of{n}.csv", out[-1].to_csv(index=False))
        return out

    write_summaries()
    try:
        _register_todo(todo, records, model_path, jobs, threads, on_done=write_summaries)
    finally:  # an interrupted run still leaves a summary of this run: the pairs it did not reach say so
        summaries = write_summaries()
    return summaries


def _same_but_threads(recorded: dict | None, qa_path: Path, row: dict, preset, model_path: str | None,
                      model_sha256: str | None) -> bool:
    """Whether the pair's recorded request differs from this one in the ITK thread count alone (``--threads``). The
    threads are hardware, not a setting of the registration: the count a pair ran with depends on ``--jobs`` too
    (``threads`` 0 is all cores, shared out between the workers), and a registration on one thread is the same
    whether ``--threads 1`` or ``--jobs`` equal to the cores gave it that thread. A cohort registered as shards with
    ``--threads 1`` was redone entirely by a rerun without it."""
    from dataclasses import is_dataclass, replace

    if recorded is None or not is_dataclass(preset):
        return False
    threads = (_read_qa(qa_path).get("settings") or {}).get("threads")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads == getattr(preset, "threads", threads):
        return False
    return same_request(recorded, cohort_request(row, replace(preset, threads=threads), model_path, model_sha256))


def _read_qa(path: Path) -> dict:
    """A finished pair's ``qa.json`` (empty when unreadable: its summary row then has blanks)."""
    import json
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _register_todo(todo, records, model_path, jobs, threads, on_done=lambda: None) -> None:
    """Register the ``todo`` pairs, in this process or in ``jobs`` workers, into their ``records`` slots, calling
    ``on_done()`` after each."""
    if jobs == 1:
        _init_worker(model_path, threads)
        for k, j, row, target, preset, request, note in progress.track(todo, "register cohort", total=len(todo),
                                                                       unit="knee"):
            records[k][j] = _run_one(row, target, preset, request, note)
            on_done()
    else:
        if model_path:  # a damaged model file: its clear error here, not a broken worker pool
            from ..synthesis.model import SynthesisModel

            SynthesisModel.load(model_path)
        with worker_pool(jobs, initializer=_init_worker, initargs=(model_path, threads)) as ex:
            futures = {ex.submit(_run_one, row, target, preset, request, note): (k, j)
                       for k, j, row, target, preset, request, note in todo}
            for fut in progress.track(as_completed(futures), "register cohort", total=len(futures), unit="knee"):
                k, j = futures[fut]
                records[k][j] = fut.result()
                on_done()
