"""Batch inference over a folder or manifest of knee CTs: resumable, shardable for cluster job arrays."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .. import progress
from ..errors import InputImageError, UserError
from ..io import ensure_writable_dir, safe_join, write_json
from ..io.atomic import (COMPLETION_MARKER, folder_name_problem, recorded_request,
                         remove_other_shard_layouts, remove_stale_staging, same_request)
from ..io.images import IMAGE_SUFFIXES, subject_from_path
from ..io.tables import line_numbers, numbers, read_table, side_letter
from .engine import (InferSettings, default_model_path, earlier_stamps, infer, load_diagnosis,
                     request_record)


def is_batch_input(path: Path) -> bool:
    """A CSV manifest, or a folder holding image files (a folder of DICOM files alone is one CT)."""
    if path.suffix.lower() == ".csv":
        return True
    return path.is_dir() and any(p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) for p in path.iterdir())


def list_cases(path: Path) -> pd.DataFrame:
    """Rows with ``subject``, ``ct`` and optional ``ct_bones`` (absolute paths) and ``slice_thickness`` (mm, the CT's
    nominal slice thickness where its file does not carry it; empty: from the file)."""
    if path.suffix.lower() == ".csv":
        df = read_table(path, "manifest", required=("ct",), error=InputImageError)
        name, lines = f"manifest {path.name}", line_numbers(df)
        empty = [line for line, p in zip(lines, df["ct"]) if not p]
        if empty:
            raise UserError(f"{name}: the 'ct' cell is empty in rows {empty[:5]}")
        df["ct"] = [str((path.parent / p).resolve()) for p in df["ct"]]
        if "ct_bones" in df.columns:
            df["ct_bones"] = [str((path.parent / p).resolve()) if p else "" for p in df.ct_bones]
        given = df["subject"] if "subject" in df.columns else [""] * len(df)
        df["subject"] = [g or subject_from_path(p) for g, p in zip(given, df["ct"])]  # an empty cell: as with no column
        if "side" in df.columns:  # as for 'ctsma dataset build': the knee's side from the scan's records
            sides, bad = [], []
            for line, value in zip(lines, df["side"]):
                try:
                    sides.append(side_letter(value) or "")
                except UserError:
                    bad.append(line)
            if bad:
                raise UserError(f"{name}: side must be L, R (or left/right) or empty; rows {bad[:5]} are not")
            df["side"] = sides
        if "slice_thickness" in df.columns:
            t = numbers(df, "slice_thickness", name)
            bad = t.notna() & ~((t > 0) & (t <= 20))
            if bad.any():
                raise UserError(f"{name}: slice_thickness must be a thickness in (0, 20] mm or empty; "
                                f"rows {[line for line, b in zip(lines, bad) if b][:5]} are not")
            df["slice_thickness"] = t
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        df = pd.DataFrame({"subject": [subject_from_path(p) for p in files], "ct": [str(p) for p in files]})
    bad = [(s, why) for s in df.subject if (why := folder_name_problem(s))]
    if bad:  # each case's outputs go to DIR/<subject>/: refused before any case is run, not when its turn comes
        raise UserError(f"manifest {path.name}: subject {bad[0][0]!r} cannot name a case folder ({bad[0][1]})")
    folded = df.subject.str.casefold()
    if folded.duplicated().any():  # 'P01' and 'p01' share one folder where names ignore case (Windows, macOS)
        dup = sorted(set(df.subject[folded.isin(folded[folded.duplicated()])]))
        raise UserError(f"duplicate subject names in {path.name} (letter case aside): {dup}")
    return df.reset_index(drop=True)


def run_batch(source, out_dir, *, shard: tuple[int, int] = (0, 1), model_path=None, settings: InferSettings,
              diagnosis_path=None) -> pd.DataFrame:
    """Analyse every case of this shard into ``out_dir/<subject>/``; finished cases are skipped on rerun."""
    cases = list_cases(Path(source))
    i, n = shard
    cases = cases.iloc[i::n]
    from ..models.export import load_student

    student = Path(model_path) if model_path else default_model_path()
    _, meta = load_student(student)                        # a bad model stops the batch here, not once per case
    diagnosis = load_diagnosis(diagnosis_path, student)
    out = ensure_writable_dir(out_dir)
    remove_other_shard_layouts(out, "batch_status_", ".json", n, "status files")  # of another --shard split
    rows = list(cases.itertuples(index=False))
    status = []
    table = _write_status(out, shard, status, rows)  # from the start: a killed batch leaves its own, not the last's
    for k, row in enumerate(progress.track(rows, "infer (batch)", unit="knee")):
        status.append(_run_case(row, out, student, settings, diagnosis_path, meta, diagnosis[0]))
        table = _write_status(out, shard, status, rows[k + 1:])
    return table


def _run_case(row, out: Path, model_path, settings: InferSettings, diagnosis_path, meta: dict, diagnosis) -> dict:
    """One case of the batch into ``out/<subject>/``: its status record (done earlier, ok or failed)."""
    d = safe_join(out, str(row.subject))
    seg = getattr(row, "ct_bones", "") or None
    thick = getattr(row, "slice_thickness", math.nan)
    case_settings = replace(settings, slice_thickness_mm=thick) if math.isfinite(thick) else settings
    if getattr(row, "side", ""):
        case_settings = replace(case_settings, side=row.side)
    note = ""
    if (d / COMPLETION_MARKER).is_file():
        remove_stale_staging(d)   # a run killed after its last move, before its clean-up
        if same_request(recorded_request(d / COMPLETION_MARKER),
                        request_record(row.ct, meta, case_settings, seg, None, diagnosis, model_path=model_path),
                        legacy=earlier_stamps(diagnosis)):
            return {"subject": row.subject, "status": "done earlier", "message": ""}
        note = "redone: its earlier results came from another CT, model or settings"
    existed = d.exists()
    try:
        with _warnings_named(row.subject):
            summary = infer(row.ct, d, model_path=model_path, segmentation=seg, diagnosis_path=diagnosis_path,
                            settings=case_settings, subject=str(row.subject))
        why = (summary.get("diagnosis") or {}).get("message") if summary.get("oa_probability") is None else ""
        if why:  # analysed, but a model that ran gave no probability (e.g. an ROI without patches): said per knee
            note = "; ".join(filter(None, [note, f"no OA probability: {why}"]))
        return {"subject": row.subject, "status": "ok", "message": note}
    except UserError as exc:  # one bad case must not stop a cohort
        if not existed and d.is_dir() and not any(d.iterdir()):
            d.rmdir()  # no empty case folder for a case that failed: its reason is in the status file
        kept = (f"; {d.name}/ still holds an earlier run's results, from another CT, model or settings"
                if note else "")
        return {"subject": row.subject, "status": "failed", "message": str(exc) + kept}
    except KeyboardInterrupt:
        if not existed and d.is_dir() and not any(d.iterdir()):
            d.rmdir()  # nor for the case a Ctrl-C stopped
        raise


NOT_RUN = "not run"
"""The status file's entry for a case this run has not finished (yet, or ever: it was stopped)."""


def _write_status(out: Path, shard: tuple[int, int], status: list[dict], remaining) -> pd.DataFrame:
    """``DIR/batch_status_<i>of<N>.json``: the cases done so far, then the ``remaining`` ones as :data:`NOT_RUN`."""
    rest = [{"subject": r.subject, "status": NOT_RUN, "message": "not finished by this run (yet); a rerun resumes"}
            for r in remaining]
    table = pd.DataFrame(status + rest, columns=["subject", "status", "message"])
    write_json(out / f"batch_status_{shard[0]}of{shard[1]}.json", json.loads(table.to_json(orient="records")))
    return table


@contextlib.contextmanager
def _warnings_named(subject):
    """Each warning of one case, said once and prefixed with its subject: in a batch, a bare 'knee side R inferred
    ...' named no knee, and Python's once-per-place rule hid the same warning for every later knee."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            # after the filters in force, not before them: a warning they ignore (by its text or module) stays
            # silenced; the others are all recorded, beyond Python's once-per-place rule
            warnings.simplefilter("always", append=True)
            yield
    finally:  # said after the recording stopped (said inside it, each would be recorded again)
        seen = set()
        for w in caught:
            if (str(w.message), w.category) not in seen:
                seen.add((str(w.message), w.category))
                warnings.warn_explicit(f"{subject}: {w.message}", w.category, w.filename, w.lineno)
