"""The patient report: ``DIR/report/patient_<subject>.pdf`` and ``.html``.

Parameter maps over coronal CT slices for each ROI, the ROI table with the training cohort's non-OA
reference ranges and z-scores, the OA probability and severity with the model's cross-validated
performance, and the model's provenance, with a "not for clinical use" notice for the demo model.
The content is built once as a :class:`~.document.Document` (:func:`build_patient_document`) and rendered
to each requested format, so the PDF and the HTML always hold the same content.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any, Mapping, Union

import pandas as pd
import SimpleITK as sitk

from .. import PARAMETERS, ROIS, __version__
from ..errors import UserError
from ..io import ensure_writable_dir
from ..io.images import check_same_geometry
from . import patient_figures
from .document import Document, Figure, Heading, PageBreak, Paragraph, Table
from .format import AGGREGATOR_LABELS, DASH, as_float, fmt, fmt_ci, fmt_int, fmt_sig, get, unit_label
from .html_render import render_html
from .paths import PATIENT_REPORT_FORMATS, _check_format
from .pdf_render import render_pdf
from .writing import write_outputs

ROI_TABLE_COLUMNS = ("roi", "parameter", "mean", "sd", "median", "iqr", "n_patches")
REFERENCE_COLUMNS = ("roi", "parameter", "mean", "sd")
Z_FLAG = 2.0
"""|z| above which a value is flagged as outside the non-OA reference range."""

DEMO_NOTICE = ("NOT FOR CLINICAL USE. These results come from the demonstration model, trained on synthetic "
               "phantom data. They show how the software works and say nothing about this patient.")
RESEARCH_NOTICE = "Research software, not a medical device. Results are not validated for diagnosis."

_DIAGNOSIS_LABELS = {"severity": "Severity (model estimate)", "threshold": "Decision threshold",
                     "auc": "Cross-validated AUC", "severity_mae": "Severity MAE (cross-validated)",
                     "severity_r2": "Severity R\u00b2 (cross-validated)", "accuracy": "Accuracy",
                     "sensitivity": "Sensitivity", "specificity": "Specificity", "f1": "F1", "brier": "Brier score",
                     "n_train": "Training patients", "model": "Model", "aggregator": "Aggregator",
                     "source": "Parameters from", "precision": "Precision", "recall": "Recall",
                     "n": "Patients in the cross-validation", "n_oa": "of which OA", "folds": "Cross-validation folds"}
# bookkeeping of the cross-validation record that a reader of a patient report does not need
_DIAGNOSIS_HIDDEN = ("auc_ci", "auc_se", "auc_ci_method", "seed", "seconds", "roc")
_INTEGER_KEYS = ("n", "folds")
_DIAGNOSIS_RESULT = ("oa_probability", "severity", "threshold")  # this knee's result, not the model's
_PROVENANCE_LABELS = {"model": "Model", "name": "Model", "version": "Model version", "trained_on": "Trained on",
                      "diagnosis_model": "Diagnosis model",
                      "demo": "Demonstration model", "created": "Created", "sha256": "SHA-256",
                      "ctsma_version": "CT-SMA version", "role": "Role", "target": "Learns",
                      "training CTs": "Training CTs"}


def is_demo(provenance: Mapping[str, Any] | None) -> bool:
    v = get(provenance, "demo")
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y")
    return bool(v)


def _text(v: Any, limit: int = 160) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt_sig(v, 4)
    if isinstance(v, (list, tuple)):
        s = ", ".join(_text(x, limit) for x in v)
    elif isinstance(v, Mapping):
        s = json.dumps(v, default=str, ensure_ascii=False)
    else:
        s = str(v)
    return s if len(s) <= limit else s[: limit - 1] + "\u2026"


def _sentence(text: Any) -> str:
    """A warning as a report sentence: capitalised, without its pointer into the documentation."""
    t = re.sub(r"\s*\(docs/[^)]*\)", "", str(text)).strip()
    t = t[:1].upper() + t[1:]
    return t if t.endswith(".") else t + "."


def analysis_notes(summary: Mapping[str, Any] | None) -> list[str]:
    """The notes of an analysis for the report, from ``ctsma infer``'s ``summary.json``: its warnings (the knee's
    side told from anatomy, a CT unlike the model's training CTs, ...), then what was done to the CT."""
    if not isinstance(summary, Mapping):
        return []
    notes = [_sentence(w) for w in summary.get("warnings") or []]
    diag = summary.get("diagnosis") if isinstance(summary.get("diagnosis"), Mapping) else {}
    if summary.get("oa_probability") is None and diag.get("message"):  # a model ran, but gave no probability
        notes.append(_sentence(f"no OA probability: {diag['message']}"))
    res = summary.get("ct_resolution") or {}
    blur = as_float(res.get("harmonisation_blur_mm"))
    if blur:
        notes.append(f"The CT was sharper in-plane than the model's training CTs (edge sigma "
                     f"{fmt_sig(res.get('inplane_edge_sigma_mm'))} mm against "
                     f"{fmt_sig(res.get('target_inplane_edge_sigma_mm', res.get('model_inplane_edge_sigma_mm')))} mm); "
                     "it was blurred in-plane by "
                     f"{fmt_sig(blur)} mm before the analysis to match them.")
    zblur = as_float(res.get("through_plane_blur_mm"))
    if zblur:
        notes.append(f"The CT's slices were thinner than the model's training CTs' "
                     f"({fmt_sig(res.get('slice_thickness_mm'))} mm against "
                     f"{fmt_sig(res.get('model_slice_thickness_mm'))} mm); it was blurred along z by "
                     f"{fmt_sig(zblur)} mm before the analysis to match them.")
    return notes


def inputs_from_summary(summary: Mapping[str, Any] | None) -> dict:
    """``diagnosis``, ``provenance``, ``notes`` and ``reference_ranges`` of a patient report from ``ctsma infer``'s
    ``summary.json`` (the keyword arguments of :func:`write_patient_report` that the summary holds; the reference
    ranges are those its diagnosis model carries)."""
    summary = summary if isinstance(summary, Mapping) else {}
    ranges = summary.get("reference_ranges")
    reference = pd.DataFrame(ranges) if isinstance(ranges, list) and ranges else None
    diag = summary.get("diagnosis") if isinstance(summary.get("diagnosis"), Mapping) else {}
    if summary.get("oa_probability") is not None:      # infer: the values on top, the model's CV metrics below
        cv = diag.get("cv_metrics") if isinstance(diag.get("cv_metrics"), Mapping) else {}
        diagnosis = {**{k: summary[k] for k in ("auc", "auc_ci") if k in summary}, **cv,
                     "oa_probability": summary["oa_probability"], "severity": summary.get("severity")}
    elif "oa_probability" in diag:
        diagnosis = dict(diag)
    else:
        diagnosis = None
    prov = summary.get("provenance")
    if not isinstance(prov, Mapping):
        model = summary.get("model") if isinstance(summary.get("model"), Mapping) else {}
        ref = (model.get("input") or {}).get("ct_reference") or {}
        prov = {"model": model.get("path"), "role": model.get("role"), "ctsma_version": model.get("ctsma_version"),
                "target": {"mr": "MR-derived reference parameters", "true": "true microstructure (phantom)"}.get(
                    model.get("target"), model.get("target")),
                "trained_on": (f"{model['trained_on']} {'phantom ' if model.get('trained_on_phantom') else ''}knees"
                               if model.get("trained_on") else None),
                "training CTs": (f"in-plane edge sigma {fmt_sig(ref.get('inplane_edge_sigma_mm'))} mm"
                                 + (f", pixels {fmt_sig(ref['inplane_spacing_mm'])} mm"
                                    if ref.get("inplane_spacing_mm") else "")
                                 + f", slices {fmt_sig(ref.get('slice_thickness_mm') or ref.get('slice_spacing_mm'))}"
                                 f" mm thick, {fmt_sig(ref.get('slice_spacing_mm'))} mm apart" if ref else None),
                "diagnosis_model": diag.get("model"),
                "demo": bool(model.get("demo") or diag.get("demo")) if model or diag else None}
        prov = {k: v for k, v in prov.items() if v is not None} or None
    return {"diagnosis": diagnosis, "provenance": dict(prov) if prov else None, "notes": analysis_notes(summary),
            "reference_ranges": reference}


def _notes_section(notes) -> list:
    if not notes:
        return []
    return [Heading("Analysis notes")] + [Paragraph(str(n), "note") for n in notes]


def _performance_row(k: str, v: Any, diagnosis: Mapping[str, Any]) -> list[str]:
    label = _DIAGNOSIS_LABELS.get(k, str(k).replace("_", " "))
    if k == "auc":
        ci = fmt_ci(diagnosis.get("auc_ci"))
        return [label, fmt(v) + ("" if ci == DASH else f" {ci}")]
    if k == "aggregator":
        return [label, AGGREGATOR_LABELS.get(str(v), _text(v))]
    if as_float(v) is not None and not isinstance(v, bool):
        return [label, fmt_int(v) if k.startswith("n_") or k in _INTEGER_KEYS else fmt(v)]
    return [label, _text(v)]


def _performance_keys(diagnosis: Mapping[str, Any]) -> list[str]:
    """The diagnosis record's keys that describe the model (its cross-validated performance), in their order."""
    return [k for k in diagnosis if k not in _DIAGNOSIS_RESULT + _DIAGNOSIS_HIDDEN
            and not str(k).startswith(("p_auc", "auc_diff"))]


def _diagnosis_section(diagnosis: Mapping[str, Any] | None) -> list:
    """This knee's result, with the model's cross-validated AUC beside it; the rest of the model's performance
    is in :func:`_performance_section`."""
    out: list = [Heading("OA probability and severity")]
    if not isinstance(diagnosis, Mapping) or not diagnosis:
        return out + [Paragraph("No diagnosis model was available, so no OA probability or severity is given.",
                                "note")]
    p = as_float(diagnosis.get("oa_probability"))
    rows = [["OA probability", DASH if p is None else f"{100 * p:.0f} %"]]
    rows += [[_DIAGNOSIS_LABELS[k], fmt(diagnosis[k], 2)] for k in _DIAGNOSIS_RESULT[1:] if k in diagnosis]
    kinds = [""] * len(rows)
    if "auc" in diagnosis:
        rows.append(_performance_row("auc", diagnosis["auc"], diagnosis))
        kinds.append("group")
    more = len(_performance_keys(diagnosis)) > ("auc" in diagnosis)
    out.append(Table(["Result", "Value"], rows, row_kinds=kinds, align=["L", "R"],
                     notes=["Shaded: the model's performance, cross-validated on its training cohort"
                            + ("; the rest of it is under \u201cDiagnosis model performance\u201d." if more else ".")]
                     if "group" in kinds else ()))
    if p is not None and 0 <= p <= 1:
        out.append(Figure(patient_figures.probability_gauge(p), "OA probability of this knee on a 0\u2013100 % scale.",
                          0.5, alt=f"OA probability {100 * p:.0f} %"))
    return out


def _performance_section(diagnosis: Mapping[str, Any] | None) -> list:
    """The diagnosis model's cross-validated performance (nothing when the record holds none beyond the AUC)."""
    keys = _performance_keys(diagnosis) if isinstance(diagnosis, Mapping) else []
    if len(keys) <= ("auc" in keys):
        return []
    rows = [_performance_row(k, diagnosis[k], diagnosis) for k in keys]
    return [Heading("Diagnosis model performance"),
            Table(["Measure", "Value"], rows, align=["L", "R"],
                  notes=["Cross-validated on the diagnosis model's training cohort (patient-level folds)."])]


def _check_table(df: Any, columns, what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise UserError(f"{what} must be a table (pandas DataFrame), got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{what} lacks the columns {', '.join(missing)}; expected {', '.join(columns)}")
    return df


def _check_reference_names(ref: dict, roi_table: pd.DataFrame) -> None:
    """Reference ranges that name none of the ROI table's (ROI, parameter) pairs are another naming (a user's CSV
    with 'medial femur' or 'BVTV'): refused, rather than a report whose z-scores are silently all empty; a partial
    match warns."""
    pairs = set(zip(roi_table["roi"].astype(str), roi_table["parameter"].astype(str)))
    if not ref.keys() & pairs:
        raise UserError(f"the reference ranges name no ROI and parameter of the ROI table (they name e.g. "
                        f"{sorted(ref)[0]}; the table holds e.g. {sorted(pairs)[0]}): use the ROI names "
                        f"{', '.join(ROIS)} and the parameters {', '.join(PARAMETERS)}")
    missing = sorted(pairs - ref.keys())
    if missing:
        import warnings

        warnings.warn(f"the reference ranges lack {len(missing)} of the ROI table's {len(pairs)} ROI/parameter "
                      f"pairs (e.g. {missing[0]}): those rows have no z-score", stacklevel=3)


def _roi_section(roi_table: pd.DataFrame | None, reference_ranges: pd.DataFrame | None) -> list:
    out: list = [Heading("Microstructure per ROI")]
    if roi_table is None or len(roi_table) == 0:
        return out + [Paragraph("No ROI table was given.", "note")]
    t = _check_table(roi_table, ROI_TABLE_COLUMNS, "the ROI table")
    ref = {}
    if reference_ranges is not None and len(reference_ranges):
        r = _check_table(reference_ranges, REFERENCE_COLUMNS, "the reference ranges")
        ref = {(str(a), str(b)): (as_float(m), as_float(s))
               for a, b, m, s in zip(r["roi"], r["parameter"], r["mean"], r["sd"])}
        _check_reference_names(ref, t)
    roi_order = list(ROIS)
    par_order = list(PARAMETERS)
    t = t.assign(_r=[roi_order.index(x) if x in roi_order else 99 for x in t["roi"].astype(str)],
                 _p=[par_order.index(x) if x in par_order else 99 for x in t["parameter"].astype(str)])
    t = t.sort_values(["_r", "_p"], kind="stable")
    rows, kinds, prev = [], [], None
    for _, row in t.iterrows():
        roi, par = str(row["roi"]), str(row["parameter"])
        mean, sd = as_float(row["mean"]), as_float(row["sd"])
        iqr = row["iqr"]
        iqr_s = fmt_ci(list(iqr), 3, sig=True) if isinstance(iqr, (list, tuple)) else fmt_sig(iqr)
        rm, rsd = ref.get((roi, par), (None, None))
        z = (mean - rm) / rsd if None not in (mean, rm, rsd) and rsd > 0 else None
        flag = DASH if z is None else ("above range" if z > Z_FLAG else "below range" if z < -Z_FLAG else "within")
        rows.append([roi if roi != prev else "", unit_label(par),
                     DASH if mean is None else f"{fmt_sig(mean)} \u00b1 {fmt_sig(sd)}",
                     fmt_sig(row["median"]), iqr_s, fmt_int(row["n_patches"]),
                     DASH if rm is None else f"{fmt_sig(rm)} \u00b1 {fmt_sig(rsd)}",
                     DASH if z is None else f"{z:+.2f}", flag])
        kinds.append("group" if prev is not None and roi != prev else "")
        prev = roi
    out.append(Table(["ROI", "Parameter", "Mean \u00b1 SD", "Median", "IQR", "Patches",
                      "Non-OA reference (mean \u00b1 SD)", "z-score", f"vs \u00b1{Z_FLAG:g} SD"],
                     rows, row_kinds=kinds, align=["L", "L", "R", "R", "R", "R", "R", "R", "C"],
                     caption="Trabecular parameters per subchondral ROI",
                     notes=["Statistics over the patches in each ROI. Reference: "
                            + (reference_ranges.attrs.get("source") if reference_ranges is not None
                               and reference_ranges.attrs.get("source") else "non-OA knees of the model's training "
                               "cohort") + "; z = (mean \u2212 reference mean) / reference SD.",
                            "ROIs: MFC/LFC medial/lateral femoral condyle, MTP/LTP medial/lateral tibial plateau."]))
    return out


def _provenance_section(provenance: Mapping[str, Any] | None) -> list:
    out: list = [Heading("Model provenance")]
    if not isinstance(provenance, Mapping) or not provenance:
        return out + [Paragraph("No model provenance was given.", "note")]
    rows = [[_PROVENANCE_LABELS.get(k, str(k).replace("_", " ")), _text(v)] for k, v in provenance.items()]
    out.append(Table(["Item", "Value"], rows, align=["L", "L"], widths=[0.25, 0.6]))
    return out


def build_patient_document(*, ct: sitk.Image, rois: sitk.Image, maps: Mapping[str, sitk.Image],
                           roi_table: pd.DataFrame | None, reference_ranges: pd.DataFrame | None,
                           diagnosis: Mapping[str, Any] | None, provenance: Mapping[str, Any] | None,
                           subject: str | None = None, notes=None) -> Document:
    """``notes``: lines under *Analysis notes* (:func:`analysis_notes` of the inference summary); none: no section."""
    check_same_geometry(ct, rois, what_a="CT", what_b="ROI label image")
    subject = subject if subject is not None else get(provenance, "subject")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sub = (f"Subject {subject}  \u00b7  " if subject is not None else "") + f"generated {now} by CT-SMA {__version__}"
    doc = Document("CT-SMA patient report", subtitle=sub)
    if is_demo(provenance):
        doc.add(Paragraph(DEMO_NOTICE, "warning"))
    doc.add(*_diagnosis_section(diagnosis), *_notes_section(notes), *_roi_section(roi_table, reference_ranges))
    doc.add(PageBreak(), Heading("Parameter maps"))
    ov = patient_figures.overview_figure(ct, rois)
    mp = patient_figures.maps_figure(ct, rois, maps or {})
    if ov is None:
        doc.add(Paragraph("The ROI label image holds no ROI, so no maps are shown.", "note"))
    else:
        doc.add(Figure(ov, "Coronal CT slice through the ROIs (radiological view: the patient's right on the "
                           "left).", 0.4))
    if mp is not None:
        doc.add(Figure(mp, "Parameter maps over the CT, per ROI: coronal slice through the ROI's largest "
                           "cross-section. Colour bars in physical units; each parameter shares one colour scale "
                           "(2nd\u201398th percentile of its values in all ROIs).", 0.76))
    elif ov is not None:
        doc.add(Paragraph("No parameter maps were given.", "note"))
    doc.add(*_performance_section(diagnosis), *_provenance_section(provenance))
    return doc


PathOrPaths = Union[str, Path, Mapping[str, Union[str, Path]]]


def _targets(out: PathOrPaths) -> dict[str, Path]:
    """``{format: path}`` from one path (its suffix is the format) or a mapping; checked before any work."""
    if isinstance(out, Mapping):
        if not out:
            raise UserError("no patient report format was asked for")
        targets = {_check_format(f): Path(p) for f, p in out.items()}
    else:
        path = Path(out)
        fmt = path.suffix.lower().lstrip(".")
        if fmt not in PATIENT_REPORT_FORMATS:
            raise UserError(f"patient report path {path} must end in "
                            + " or ".join(f".{f}" for f in PATIENT_REPORT_FORMATS))
        targets = {fmt: path}
    for fmt, path in targets.items():
        if path.suffix.lower() != f".{fmt}":
            raise UserError(f"patient report path {path} must end in .{fmt} for the {fmt.upper()} report")
        if path.is_dir():
            raise UserError(f"patient report path {path} is a folder")
    return targets


def _render(doc: Document, fmt: str, footer: str) -> bytes:
    return render_pdf(doc, footer=footer) if fmt == "pdf" else render_html(doc, footer=footer).encode("utf-8")


def write_patient_report(out: PathOrPaths, *, ct: sitk.Image, rois: sitk.Image, maps: Mapping[str, sitk.Image],
                         roi_table: pd.DataFrame | None, reference_ranges: pd.DataFrame | None,
                         diagnosis: Mapping[str, Any] | None, provenance: Mapping[str, Any] | None,
                         subject: str | None = None, notes=None) -> Path | dict[str, Path]:
    """Write the patient report atomically and return its path(s).

    ``out``: one path, whose suffix (``.pdf`` or ``.html``) is the format, and then the path is returned;
    or ``{format: path}`` for several formats (e.g. ``{f: patient_report_path(run_dir, subject, f) for f in
    PATIENT_REPORT_FORMATS}``), and then ``{format: Path}`` is returned. The document is built once and rendered to
    every format in memory before anything is written; then all files are written or none
    (:func:`.writing.write_outputs`). Use :func:`.paths.patient_report_path` for the contract names
    ``DIR/report/patient_<subject>.<format>``.

    ``maps``: parameter → map image (NaN outside the ROIs; resampled to the CT's grid if needed).
    ``roi_table``: columns ``roi, parameter, mean, sd, median, iqr, n_patches``. ``reference_ranges``:
    columns ``roi, parameter, mean, sd`` (non-OA knees of the training cohort). ``diagnosis``: dict with
    ``oa_probability``, ``severity`` and the model's cross-validated performance (``auc``, ``auc_ci``, ...)
    or None. ``provenance``: dict (``model``, ``version``, ``trained_on``, ``demo``, ...).
    """
    targets = _targets(out)
    doc = build_patient_document(ct=ct, rois=rois, maps=maps, roi_table=roi_table,
                                 reference_ranges=reference_ranges, diagnosis=diagnosis, provenance=provenance,
                                 subject=subject, notes=notes)
    footer = ("DEMO MODEL \u2013 NOT FOR CLINICAL USE" if is_demo(provenance) else RESEARCH_NOTICE)
    files = {path: _render(doc, fmt, footer) for fmt, path in targets.items()}
    for folder in dict.fromkeys(p.parent for p in files):
        ensure_writable_dir(folder)  # a clear error for an unusable output folder
    write_outputs(files)
    return targets if isinstance(out, Mapping) else next(iter(targets.values()))
