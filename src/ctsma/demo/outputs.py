"""The demo's final outputs: metrics.json, study report, patient report and the Slicer scene."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import PARAMETER_FILE_NAMES, PARAMETERS, progress
from ..io import write_json
from .stages import Context, inference_subject


def collect_metrics(ctx: Context, timings: dict) -> dict:
    ev = json.loads((ctx.out / "evaluation" / "metrics.json").read_text(encoding="utf-8"))
    metrics = {k: ev[k] for k in ("regression", "regression_vs_truth", "distillation_gain",
                                  "distillation_gain_vs_truth", "regression_info") if k in ev}
    metrics["diagnosis"] = json.loads((ctx.out / "diagnosis" / "diagnosis_metrics.json").read_text(encoding="utf-8"))
    metrics["registration"] = json.loads((ctx.out / "registration" / "registration_metrics.json").read_text(encoding="utf-8"))
    metrics["timing"] = {k: float(v) for k, v in timings.items()}
    metrics["demo"] = {"settings": ctx.s.__dict__, "n_knees": int(len(ctx.cohort()))}
    return metrics


def _predictions(ctx: Context) -> dict[str, pd.DataFrame]:
    """Long tables (subject, roi, param, reference, predicted) of the out-of-fold patches, per source."""
    from ..evaluation.regression import predictions_by_source

    return predictions_by_source(pd.read_csv(ctx.out / "evaluation" / "regression_predictions.csv"))


def _roc(ctx: Context) -> dict:
    from ..diagnosis.report import roc_inputs

    return roc_inputs(pd.read_csv(ctx.out / "diagnosis" / "oof_predictions.csv"))


def patient_report(ctx: Context) -> dict[str, Path]:
    """The held-out knee's patient report, PDF and HTML: ``{format: path}``."""
    from ..io import read_image
    from ..report import write_patient_report
    from ..report.patient import inputs_from_summary
    from ..report.paths import PATIENT_REPORT_FORMATS, patient_report_path

    subject = inference_subject(ctx)
    d = ctx.out / "inference" / subject
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    ct = read_image(summary["ct"], what="CT")
    rois = sitk.ReadImage(str(d / "rois.nii.gz"), sitk.sitkUInt8)
    roi_arr = sitk.GetArrayViewFromImage(rois) > 0
    maps = {}
    for p in PARAMETERS:
        m = sitk.ReadImage(str(d / "maps" / f"{PARAMETER_FILE_NAMES[p]}.nii.gz"), sitk.sitkFloat32)
        a = sitk.GetArrayFromImage(m)
        a[~roi_arr] = np.nan  # the file's documented background (0) is shown as transparent
        img = sitk.GetImageFromArray(a)
        img.CopyInformation(m)
        maps[p] = img
    inputs = inputs_from_summary(summary)
    inputs["provenance"] = {**(inputs["provenance"] or {}), "demo": True,
                            "trained_on": f"{summary['model'].get('trained_on')} phantom knees (the cross-fitting "
                                          f"fold that held {subject} out)"}
    out = {f: patient_report_path(ctx.out, subject, f) for f in PATIENT_REPORT_FORMATS}
    return write_patient_report(out, ct=ct, rois=rois, maps=maps, roi_table=pd.read_csv(d / "roi_table.csv"),
                                subject=subject, **inputs)


def _slicer_lib() -> bool:
    """Make the Slicer-side helpers importable from a source checkout (they live beside the package)."""
    root = Path(__file__).resolve().parents[3] / "CTSMA"
    if (root / "CTSMALib").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        import CTSMALib  # noqa: F401
        import slicer  # noqa: F401
        return hasattr(slicer, "vtkMRMLScene")
    except ImportError:
        return False


def _remove_scenes(out: Path) -> bool:
    found = list((out / "scene").glob("*.mrb"))
    for f in found:
        f.unlink()
    return bool(found)


DEMO_STAGES = ("phantom", "synthesis", "registration", "dataset", "training", "evaluation", "diagnosis", "inference")


def check_demo_folder(out: Path) -> None:
    """Refuse an ``--out`` folder that holds another command's results where the demo writes and removes its own
    (``metrics.json``, ``report/``, ``scene/``): :func:`remove_earlier_outputs` would delete them, e.g. the
    ``metrics.json`` that ``ctsma evaluate`` and ``ctsma diagnose evaluate`` share. A demo's folder (its stage
    records in ``.stages/`` or a stage's folder) and a new or unrelated folder are accepted."""
    from ..errors import UserError

    out = Path(out)
    if (out / ".stages").is_dir() or any((out / name).is_dir() for name in DEMO_STAGES):
        return
    theirs = [name for name, there in (("metrics.json", (out / "metrics.json").exists()),
                                       ("report/", (out / "report").exists()), ("scene/", (out / "scene").exists()))
              if there]
    if theirs:
        raise UserError(f"--out {out} holds {', '.join(theirs)} of another command, not of a demo: the demo would "
                        "replace them; choose a new or empty folder (or an earlier demo's)")


def remove_earlier_outputs(out: Path) -> None:
    """Remove an earlier run's ``metrics.json``, ``report/`` and scene, which the report stage writes outside the
    stages' folders: called when a stage before the report is to run, so that a rerun with other settings that fails
    or is killed does not leave the earlier results beside its own stages, as if they were this run's."""
    import shutil

    found = _remove_scenes(out) | (out / "metrics.json").is_file() | (out / "report").is_dir()
    (out / "metrics.json").unlink(missing_ok=True)
    shutil.rmtree(out / "report", ignore_errors=True)
    if found:
        progress.info("earlier results (metrics.json, report/, scene/) removed: they are rewritten when this run's "
                      "stages have finished")


def scene(ctx: Context) -> Path | None:
    """A Slicer scene (.mrb) of the inference knee: CT, MR, ROIs, maps, tables, registration transform. An earlier
    run's scene is removed first: it showed another held-out knee (another seed or cohort), or the results before
    this run's when slicer-core is missing now."""
    _remove_scenes(ctx.out)
    if not _slicer_lib():
        warnings.warn("slicer-core is not installed: the Slicer scene (.mrb) is skipped "
                      "(pip install slicer-core==5.13.31053.0)", stacklevel=2)
        return None
    from CTSMALib.demo_scene import write_demo_scene

    subject = inference_subject(ctx)
    row = ctx.cohort().set_index("subject").loc[subject]
    root = ctx.manifest.parent
    return write_demo_scene(ctx.out / "scene" / f"{subject}.mrb", ct=root / row.ct, mr=root / row.mr,
                            infer_dir=ctx.out / "inference" / subject,
                            transform=ctx.out / "registration" / "cohort" / subject / "transform_ct_to_mr.h5")


def report(ctx: Context, d: Path, timings: dict) -> dict:
    from ..report import write_readme_snippet, write_study_report

    metrics = collect_metrics(ctx, timings)
    write_json(ctx.out / "metrics.json", metrics)
    paths = write_study_report(metrics, ctx.out, cohort=ctx.cohort(), predictions=_predictions(ctx), roc=_roc(ctx),
                               timings=timings, title="CT-SMA end-to-end demo on the digital knee phantom")
    pr = patient_report(ctx)
    snip = write_readme_snippet(metrics, d)
    mrb = scene(ctx)
    return {"study": [str(p) for p in paths.values()], "patient": {f: str(p) for f, p in pr.items()}, "scene": str(mrb) if mrb else None,
            "readme_snippet": {k: str(v) for k, v in snip.items() if v}}
