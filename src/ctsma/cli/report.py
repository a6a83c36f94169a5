"""``ctsma report study|patient``: render the study report or a patient report from files (docs/report.md)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="render the study report or a patient report (HTML + PDF)")
    rsub = p.add_subparsers(dest="report_command", metavar="KIND")
    s = rsub.add_parser("study", help="RUN_DIR/report/study.html and study.pdf from metrics.json")
    s.add_argument("run_dir", metavar="RUN_DIR", help="run folder; the report goes to RUN_DIR/report/")
    s.add_argument("--metrics", default=None, help="metrics.json (default: RUN_DIR/metrics.json)")
    s.add_argument("--manifest", default=None, help="phantom manifest.csv for the cohort summary")
    s.add_argument("--predictions", default=None,
                   help="CSV of held-out patches: source, subject, roi, param, reference, predicted; or the "
                   "regression_predictions.csv of 'ctsma evaluate'")
    s.add_argument("--roc", default=None, help="CSV of patient scores: key (source/aggregator), y_true, y_score; or the "
                   "oof_predictions.csv of 'ctsma diagnose evaluate'")
    s.add_argument("--figures", default=None, help="folder of extra PNG figures to append")
    s.add_argument("--readme-snippet", default=None, metavar="DIR",
                   help="also write key_table.md and key_figure.png to DIR")
    s.set_defaults(func=run_study)
    q = rsub.add_parser("patient", help="patient_<subject>.pdf and .html from a CT and its 'ctsma infer' output folder")
    q.add_argument("ct", metavar="CT", help="the CT image (NIfTI, NRRD, MHA or DICOM folder)")
    q.add_argument("infer_dir", metavar="INFER_DIR", help="output folder of 'ctsma infer' for this CT")
    q.add_argument("--subject", default=None, help="subject ID (default: from summary.json, else the CT's name)")
    q.add_argument("--reference", default=None,
                   help="CSV of non-OA reference ranges: roi, parameter, mean, sd (default: from summary.json)")
    q.add_argument("--out", default=None, help="run folder; the report goes to OUT/report/ (default: INFER_DIR)")
    q.add_argument("--format", choices=("pdf", "html", "both"), default="both",
                   help="report format(s) to write (default: both, from one rendering of the content)")
    q.set_defaults(func=run_patient)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _read_csv(path, what: str, columns):
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {what} file {path}: {exc}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{what} file {path} lacks the columns {', '.join(missing)}")
    return df


COHORT_NUMBERS = ("kl_grade", "oa", "severity")
"""Number columns of a ``--manifest`` that the cohort summary uses (with the ``true_<ROI>_<param>`` columns)."""


def _read_cohort_manifest(path):
    """``--manifest``: read by :func:`ctsma.io.tables.read_table` (cells as text, as every command reads its
    manifest), with the number columns the cohort summary uses as numbers (a cell that is not one refused)."""
    from ..io.tables import numbers, read_table

    df = read_table(path, "manifest", required=["subject"])
    for col in df.columns:
        if col in COHORT_NUMBERS or col.startswith("true_"):
            df[col] = numbers(df, col, f"manifest {Path(path).name}")
    return df


def _read_roc(path) -> dict:
    """``{key: {y_true, y_score}}`` from a CSV of ``key, y_true, y_score``, or from ``diagnose evaluate``'s
    ``oof_predictions.csv`` (key = source/aggregator, y_true = oa, y_score = oa_probability)."""
    from ..diagnosis.report import OOF_COLUMNS, roc_inputs

    df = _read_csv(path, "ROC", [])
    if not {"key", "y_true", "y_score"} <= set(df.columns) and set(OOF_COLUMNS) <= set(df.columns):
        return roc_inputs(df)
    missing = [c for c in ("key", "y_true", "y_score") if c not in df.columns]
    if missing:
        raise UserError(f"ROC file {path} lacks the columns {', '.join(missing)} (or give the oof_predictions.csv of "
                        f"'ctsma diagnose evaluate': {', '.join(OOF_COLUMNS)})")
    return {str(k): {"y_true": g["y_true"].to_numpy(), "y_score": g["y_score"].to_numpy()}
            for k, g in df.groupby("key", sort=False)}


PREDICTION_COLUMNS = ("source", "subject", "roi", "param", "reference", "predicted")
"""``--predictions`` as a long table: one row per held-out patch, source and parameter."""


def _read_predictions(path) -> dict:
    """``{source: DataFrame}`` of held-out patches from a long table of :data:`PREDICTION_COLUMNS`, or from the
    ``regression_predictions.csv`` of ``ctsma evaluate`` as it is (``subject, roi, mr_<param>, <source>_<param>``)."""
    from .. import PARAMETERS
    from ..evaluation.regression import predictions_by_source

    df = _read_csv(path, "predictions", [])
    if set(PREDICTION_COLUMNS) <= set(df.columns):
        return {str(k): g.drop(columns="source") for k, g in df.groupby("source", sort=False)}
    by_source = predictions_by_source(df) if {"subject", "roi"} <= set(df.columns) else {}
    if by_source:
        return by_source
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    raise UserError(f"predictions file {path} lacks the columns {', '.join(missing)} (or give the "
                    f"regression_predictions.csv of 'ctsma evaluate': subject, roi, and mr_<param> and "
                    f"<source>_<param> for a <param> of {', '.join(PARAMETERS)})")


def run_study(args) -> int:
    from .. import progress
    from ..report import write_readme_snippet, write_study_report
    from ..report.study import load_metrics

    run_dir = Path(args.run_dir)
    metrics = load_metrics(args.metrics or run_dir / "metrics.json")
    cohort = _read_cohort_manifest(args.manifest) if args.manifest else None
    predictions = _read_predictions(args.predictions) if args.predictions else None
    roc = None
    if args.roc:
        roc = _read_roc(args.roc)
    if args.figures and not Path(args.figures).is_dir():
        raise UserError(f"--figures: {args.figures} is not a folder of PNG figures")
    if args.readme_snippet:  # checked before the study report is replaced
        from ..io import ensure_writable_dir

        snip_dir = ensure_writable_dir(args.readme_snippet)
        for name in ("key_table.md", "key_figure.png"):
            if (snip_dir / name).is_dir():
                raise UserError(f"--readme-snippet: {snip_dir / name} is a folder; it would be overwritten by a file")
    paths = write_study_report(metrics, run_dir, cohort=cohort, predictions=predictions, roc=roc,
                               figures_dir=args.figures)
    progress.info(f"study report: {paths['html']} and {paths['pdf']}")
    if args.readme_snippet:
        snip = write_readme_snippet(metrics, args.readme_snippet)
        progress.info(f"README snippet: {snip['table']}" + (f" and {snip['figure']}" if snip["figure"] else ""))
    return 0


def _read_map(path: Path, param: str):
    """A parameter map: NaN outside the ROIs is expected, so only the geometry is validated."""
    import SimpleITK as sitk

    from ..errors import InputImageError
    from ..io import check_image
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError:
        raise InputImageError(f"{param} map {path} cannot be read (corrupt or not an image)") from None
    return check_image(img, what=f"{param} map", allow_nonfinite=True)


def run_patient(args) -> int:
    import SimpleITK as sitk

    from .. import PARAMETER_FILE_NAMES, progress
    from ..io import read_image
    from ..io.images import subject_from_path
    from ..report import PATIENT_REPORT_FORMATS, patient_report_path, write_patient_report
    from ..report.patient import inputs_from_summary

    d = Path(args.infer_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not a folder; give the output folder of 'ctsma infer'")
    if not (d / "rois.nii.gz").exists() and any(d.glob("batch_status_*of*.json")):
        raise UserError(f"{d} is the output folder of a batch of CTs; give the folder of one knee, {d}/<subject>")
    missing = [n for n in ("summary.json", *(f"maps/{f}.nii.gz" for f in PARAMETER_FILE_NAMES.values()))
               if not (d / n).is_file()]
    if missing:  # without summary.json the report would say no diagnosis model ran, and drop the demo notice
        raise UserError(f"{d} is not a complete 'ctsma infer' output folder: {', '.join(missing)} missing "
                        "(rerun 'ctsma infer')")
    from ..errors import InputImageError
    from ..io.images import check_ct_intensities, check_same_geometry

    ct = read_image(args.ct, what="CT")
    check_ct_intensities(ct)  # a label image or an MR would be drawn as the CT, as infer refuses them
    rois = read_image(d / "rois.nii.gz", what="ROI label image", pixel_type=sitk.sitkUInt8)
    try:
        check_same_geometry(ct, rois, what_a="CT", what_b="ROI label image")
    except InputImageError as exc:
        raise InputImageError(f"{exc}: is {args.ct} the CT that 'ctsma infer' analysed into {d}?") from None
    if not sitk.GetArrayViewFromImage(rois).any():
        raise UserError(f"the ROI label image {d / 'rois.nii.gz'} is empty: nothing to report (rerun 'ctsma infer')")
    maps = {p: _read_map(d / "maps" / f"{f}.nii.gz", p) for p, f in PARAMETER_FILE_NAMES.items()}
    roi_table = _read_csv(d / "roi_table.csv", "ROI table", ["roi", "parameter", "mean"])
    try:
        summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"cannot read {d / 'summary.json'}: {exc}") from None
    if not isinstance(summary, dict):
        raise UserError(f"{d / 'summary.json'} is not a JSON object as 'ctsma infer' writes it (rerun 'ctsma infer')")
    inputs = inputs_from_summary(summary)
    if args.reference:
        inputs["reference_ranges"] = _read_csv(args.reference, "reference ranges", ["roi", "parameter", "mean", "sd"])
        inputs["reference_ranges"].attrs["source"] = f"the ranges given in {Path(args.reference).name}"
    subject = args.subject or summary.get("subject") or subject_from_path(args.ct)
    formats = PATIENT_REPORT_FORMATS if args.format == "both" else (args.format,)
    out = {f: patient_report_path(args.out or d, subject, f) for f in formats}
    write_patient_report(out, ct=ct, rois=rois, maps=maps, roi_table=roi_table, subject=subject, **inputs)
    progress.info("patient report: " + " and ".join(str(p) for p in out.values()))
    return 0
