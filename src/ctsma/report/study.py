"""The study report: ``DIR/report/study.html`` and ``DIR/report/study.pdf``.

It renders ``metrics.json`` (see ``docs/report.md`` and the contracts) with the cohort manifest,
held-out predictions for scatter/Bland–Altman plots, ROC points and stage timings. Every input but
``metrics`` is optional, any value may be null and any block may be missing: the section then shows
"–" or a note saying what did not run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .. import PARAMETERS, ROIS, __version__, progress
from ..errors import UserError
from ..io import ensure_writable_dir, safe_join
from ..io.tables import yes_no_numbers
from . import figures
from .document import Document, Figure, Heading, PageBreak, Paragraph, Table
from .format import (DASH, as_float, diagnosis_label, fmt, fmt_ci, fmt_int, fmt_seconds, fmt_sig,
                     fmt_with_ci, get, source_label, unit_label)
from .html_render import render_html
from .pdf_render import render_pdf
from .published import (PUBLISHED_AGGREGATOR_AUC, PUBLISHED_DIAGNOSIS, PUBLISHED_ICC, PUBLISHED_LABEL,
                        PUBLISHED_MEAN_ICC)
from .writing import write_outputs

SOURCE_ORDER = ("teacher", "student_distilled", "student_baseline", "ct_direct", "mr_reference", "radiomics",
                "truth")
AGGREGATOR_ORDER = ("transformer", "cnn", "mlp", "logistic", "mean")
MAX_EXTRA_FIGURES = 12
MAX_LISTED_SUBJECTS = 60
MAX_EXTRA_FIGURE_BYTES = 8 * 1024 * 1024


def _ordered(keys, order) -> list:
    keys = list(keys)
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), keys.index(k)))


def load_metrics(metrics: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    """``metrics`` itself, or the JSON file it names (a clear error when missing or malformed)."""
    if isinstance(metrics, Mapping):
        return metrics
    if isinstance(metrics, (str, os.PathLike)):
        p = Path(metrics)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"metrics file {p} does not exist; run 'ctsma evaluate' first") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read metrics file {p}: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"metrics file {p} does not hold a JSON object")
        if not any(k in data for k in ("regression", "diagnosis", "registration")):
            raise UserError(f"metrics file {p} has none of the blocks a study report shows (regression, diagnosis, "
                            "registration); give the metrics.json of 'ctsma evaluate' or 'ctsma demo'")
        return data
    raise TypeError(f"metrics must be a mapping or a path, got {type(metrics).__name__}")


# -- sections -----------------------------------------------------------------------------------------
def _summary(m: Mapping[str, Any]) -> list:
    lines = []
    d = as_float(get(m, "regression", "student_distilled", "mean_icc21"))
    b = as_float(get(m, "regression", "student_baseline", "mean_icc21"))
    if d is not None:
        s = f"Mean ICC(2,1) of the distilled CT student against the MR reference: {d:.3f}"
        if b is not None:
            s += f" (without distillation: {b:.3f})"
        lines.append(s + f"; {PUBLISHED_LABEL}: {PUBLISHED_MEAN_ICC:.3f}.")
    g = get(m, "distillation_gain")
    if as_float(get(g, "mean_icc21_diff")) is not None:
        lines.append(f"Distillation gain in mean ICC(2,1): {fmt(get(g, 'mean_icc21_diff'))} "
                     f"(95 % CI {fmt_ci(get(g, 'ci'))}).")
    auc = as_float(get(m, "diagnosis", "student_distilled/transformer", "auc"))
    if auc is not None:
        lines.append(f"OA diagnosis AUC, distilled parameters with Transformer aggregation: {auc:.3f} "
                     f"(95 % CI {fmt_ci(get(m, 'diagnosis', 'student_distilled/transformer', 'auc_ci'))}); "
                     f"{PUBLISHED_LABEL}: {PUBLISHED_DIAGNOSIS['CT-SMA (distilled)'][3]:.3f}.")
    return [Paragraph(s) for s in lines]


def on_phantom(m: Mapping[str, Any]) -> bool:
    """Whether these metrics come from the digital phantom: only a phantom run has the truth to score against
    (``regression_vs_truth``) or the demo's own block. A user's cohort is then not called phantom data."""
    return bool(get(m, "regression_vs_truth") or get(m, "demo"))


def _cohort(cohort: pd.DataFrame | None, phantom: bool = True) -> list:
    out: list = [Heading("Cohort")]
    if cohort is None or not isinstance(cohort, pd.DataFrame) or cohort.empty:
        return out + [Paragraph("No cohort manifest was given.", "note")]
    c = cohort
    rows = [["Knees", fmt_int(len(c))]]
    if "subject" in c:
        rows.append(["Subjects", fmt_int(c["subject"].nunique())])
    if "side" in c:
        counts = c["side"].astype(str).value_counts()
        rows.append(["Side (L / R)", f"{counts.get('L', 0)} / {counts.get('R', 0)}"])
    if "kl_grade" in c:
        kl = pd.to_numeric(c["kl_grade"], errors="coerce").dropna().astype(int).value_counts().sort_index()
        rows.append(["KL grade 0 / 1 / 2 / 3 / 4", " / ".join(str(kl.get(g, 0)) for g in range(5))])
    if "oa" in c:
        oa = yes_no_numbers(c["oa"])
        # the phantom's label is a KL-like grade >= 2; a user's cohort brings its own definition in its 'oa' column
        rows.append(["OA (KL \u2265 2)" if phantom else "OA (as labelled)",
                     f"{int((oa == 1).sum())} ({100 * float((oa == 1).mean()):.0f} %)"])
    if "severity" in c:
        s = pd.to_numeric(c["severity"], errors="coerce").dropna()
        if len(s):
            rows.append(["Severity, mean \u00b1 SD (range)",
                         f"{s.mean():.2f} \u00b1 {s.std(ddof=1) if len(s) > 1 else 0:.2f} "
                         f"({s.min():.2f}\u2013{s.max():.2f})"])
    out.append(Table(["Cohort", "Value"], rows, caption="Phantom cohort" if phantom else "Cohort",
                     align=["L", "R"]))
    if "subject" in c:
        names = [f"{s} ({d})" if "side" in c and pd.notna(d) and str(d).strip() else str(s)  # no side given: no ()
                 for s, d in zip(c["subject"], c["side"] if "side" in c else c["subject"])]
        more = f", and {len(names) - MAX_LISTED_SUBJECTS} more" if len(names) > MAX_LISTED_SUBJECTS else ""
        out.append(Paragraph("Knees: " + ", ".join(names[:MAX_LISTED_SUBJECTS]) + more + ".", "note"))
    truth_rows, kinds = [], []
    oa = yes_no_numbers(c["oa"]) if "oa" in c else None
    for roi in ROIS:
        for p in PARAMETERS:
            col = f"true_{roi}_{p}"
            if col not in c:
                continue
            v = pd.to_numeric(c[col], errors="coerce")

            def ms(x):
                x = x.dropna()
                return DASH if x.empty else f"{fmt_sig(x.mean())} \u00b1 {fmt_sig(x.std(ddof=1) if len(x) > 1 else 0)}"
            row = [roi, unit_label(p), ms(v)]
            if oa is not None:
                row += [ms(v[oa == 0]), ms(v[oa == 1])]
            truth_rows.append(row)
            kinds.append("group" if p == PARAMETERS[0] and truth_rows[:-1] else "")
    if truth_rows:
        cols = ["ROI", "Parameter", "All knees"] + (["Non-OA", "OA"] if oa is not None else [])
        out.append(Table(cols, truth_rows, row_kinds=kinds, align=["L", "L"] + ["R"] * (len(cols) - 2),
                         caption="Phantom truth: true microstructure per ROI (mean \u00b1 SD over knees)"))
    return out


def _registration(m: Mapping[str, Any]) -> list:
    out: list = [Heading("Registration accuracy")]
    reg = get(m, "registration")
    if not isinstance(reg, Mapping) or not reg:
        return out + [Paragraph("Not available: metrics.json has no \"registration\" block "
                                "(the registration evaluation did not run).", "note")]
    rows = [[str(v).replace("_", " "), fmt(get(r, "tre_mean_mm"), 2), fmt(get(r, "tre_p95_mm"), 2),
             fmt_sig(get(r, "seconds_per_knee"))] for v, r in reg.items()]
    header = ["Variant", "TRE mean (mm)", "TRE 95th percentile (mm)", "Seconds per knee"]
    notes = ["TRE: distance between each landmark mapped by the transform and its true MR position."]
    # the demo scores the variants on a few of the full pipeline's knees: say on how many, and the full pipeline's
    # TRE on those same knees, else a variant's TRE is compared with one over other knees
    if any(get(r, "n_knees") is not None for r in reg.values()):
        header.append("Knees (landmarks)")
        for row, r in zip(rows, reg.values()):
            row.append(f"{fmt_int(get(r, 'n_knees'))} ({fmt_int(get(r, 'n_landmarks'))})")
    for v, r in reg.items():
        same = as_float(get(r, "tre_mean_mm_variant_knees"))
        if same is not None:
            name, mean_all = str(v).replace("_", " "), fmt(get(r, "tre_mean_mm"), 2)
            notes.append(f"The other variants ran on fewer knees; on their knees, {name} has a TRE mean of "
                         f"{fmt(same, 2)} mm (compare with that, not with the {mean_all} mm over all its knees).")
    out.append(Table(header, rows,
                     caption="Target registration error at the phantom's landmarks (CT \u2192 MR), all variants",
                     notes=notes))
    return out


def _regression(m: Mapping[str, Any]) -> list:
    out: list = [Heading("Parameter agreement (ICC)")]
    reg, truth = get(m, "regression"), get(m, "regression_vs_truth")
    reg = reg if isinstance(reg, Mapping) else {}
    truth = truth if isinstance(truth, Mapping) else {}
    sources = _ordered(dict.fromkeys([*reg, *truth]), SOURCE_ORDER)
    if not sources:
        return out + [Paragraph("Not available: metrics.json has no \"regression\" block "
                                "(the patch-level evaluation did not run).", "note")]
    if not reg:
        out.append(Paragraph("No agreement with the MR reference was computed; only agreement with the "
                             "phantom's truth is shown.", "note"))
    png = figures.icc_bar_chart(m, block="regression" if reg else "regression_vs_truth")
    if png:
        out.append(Figure(png, "ICC(2,1) per parameter with 95 % CIs. Red diamonds: CT-SMA, "
                               f"{PUBLISHED_LABEL} (preprint per parameter; journal mean).", 0.58))
    rows, kinds = [], []
    for p in [*PARAMETERS, None]:
        for i, s in enumerate(sources):
            r = get(reg, s, p) if p else None
            pub = (PUBLISHED_ICC.get(p) if p else PUBLISHED_MEAN_ICC) if s == "student_distilled" else None
            tr = get(truth, s, p, "icc21") if p else get(truth, s, "mean_icc21")
            tr_r = get(truth, s, p, "pearson_r") if p else None
            if p is None:
                row = ["mean of 4", source_label(s), fmt(get(reg, s, "mean_icc21")), DASH, DASH, DASH, DASH,
                       DASH, fmt(tr), DASH, fmt(pub)]
            else:
                bias = fmt_sig(get(r, "ba_bias"))
                loa = fmt_ci(get(r, "ba_loa"), 3, sig=True)
                row = [unit_label(p), source_label(s), fmt_with_ci(get(r, "icc21"), get(r, "icc21_ci")),
                       fmt_with_ci(get(r, "icc31"), get(r, "icc31_ci")), fmt(get(r, "pearson_r")),
                       fmt_sig(get(r, "mae")), bias if loa == DASH else f"{bias} {loa}",
                       f"{fmt_int(get(r, 'n_patients'))} / {fmt_int(get(r, 'n_patches'))}", fmt(tr), fmt(tr_r),
                       fmt(pub)]
            rows.append(row)
            kinds.append("group" if i == 0 and rows[:-1] else "")
    header = ["Parameter", "Source", "ICC(2,1) [95 % CI]", "ICC(3,1) [95 % CI]", "Pearson r", "MAE",
              "Bland\u2013Altman bias [LoA]", "Patients / patches", "ICC(2,1) vs phantom truth",
              "Pearson r vs phantom truth", f"ICC, {PUBLISHED_LABEL}"]
    truth_note = ["The teacher predicts from MR patches; the other sources from CT. \"vs phantom truth\" scores the "
                  "same predictions against the phantom's true microstructure. The models learn the MR reference, "
                  "whose apparent Tb.Th, Tb.Sp and Tb.N differ in scale from the true ones (on the demo phantom "
                  "Tb.Th reads about 3\u00d7 the truth at the MR's resolution), so absolute agreement with the truth "
                  "(ICC(2,1)) is near 0 for them by construction; Pearson r shows how closely the predictions "
                  "follow the truth."]
    if not truth:  # a cohort without phantom truth: no columns of dashes, no note about a truth it does not have
        keep = [j for j, h in enumerate(header) if "phantom truth" not in h]
        header, rows = [header[j] for j in keep], [[r[j] for j in keep] for r in rows]
        truth_note = ["The teacher predicts from MR patches; the other sources from CT."]
    out.append(Table(
        header, rows, row_kinds=kinds, align=["L", "L"] + ["R"] * (len(header) - 2),
        caption="Per-parameter agreement with the MR reference on held-out patients",
        notes=["ICC(2,1): two-way random effects, absolute agreement, single measure; ICC(3,1): two-way mixed, "
               "consistency. CIs and Bland\u2013Altman limits of agreement (bias \u00b1 1.96 SD) as computed by "
               "the evaluation. MAE and bias are in the parameter's unit.",
               *truth_note,
               f"Published ICCs ({PUBLISHED_LABEL}, CT-SMA): per parameter from the 2023 preprint, the mean "
               "(0.742) from the 2026 journal paper; the ICC type was not stated there.",
               *_flips_note(m)]))
    g = get(m, "distillation_gain")
    if isinstance(g, Mapping):
        out.append(Paragraph(f"Distillation gain (distilled \u2212 baseline mean ICC(2,1)): "
                             f"{fmt(get(g, 'mean_icc21_diff'))}, 95 % CI {fmt_ci(get(g, 'ci'))}."))
    return out


def _scatter(predictions: Mapping[str, pd.DataFrame] | None) -> list:
    out: list = [Heading("Scatter and Bland\u2013Altman plots")]
    if not isinstance(predictions, Mapping) or not predictions:
        return out + [Paragraph("No held-out predictions were given, so no scatter or Bland\u2013Altman plots.",
                                "note")]
    n = 0
    for src in _ordered(predictions, SOURCE_ORDER):
        df = predictions[src]
        png = figures.scatter_ba_figure(df, src)
        if png is None:
            continue
        n += 1
        note = f" A random subset of {figures.MAX_POINTS} patches per parameter is drawn." \
            if (df["param"].value_counts() > figures.MAX_POINTS).any() else ""
        out.append(Figure(png, f"{source_label(src)}: predicted vs MR reference per held-out patch (top; dashed: "
                               "identity) and Bland\u2013Altman plot (bottom; solid: bias, dashed: 95 % limits "
                               f"of agreement). Colours: ROI.{note}", 0.98))
    return out if n else out + [Paragraph("The prediction tables were empty.", "note")]


def _flips_note(m: Mapping[str, Any]) -> list[str]:
    """How each patch prediction was formed (evaluation's ``regression_info.flips``), when recorded."""
    n = get(m, "regression_info", "flips")
    if not isinstance(n, int) or n < 2:
        return []
    return [f"Each patch prediction is the mean over {n} flipped copies of the patch, as CT-only inference "
            "reports it."]


def _members_note(diag: Mapping[str, Any], keys) -> list[str]:
    """The neural aggregators' ensemble sizes, when recorded."""
    sizes = {}
    for k in keys:
        members = get(diag, k, "config", "members")
        if isinstance(members, int):
            sizes.setdefault(diagnosis_label(k)[1], members)
    if not sizes:
        return []
    return ["Neural aggregators are ensembles of networks that differ only in their seed (the mean of their "
            "probabilities): " + ", ".join(f"{a} {n}" for a, n in sizes.items()) + "."]


def _diagnosis(m: Mapping[str, Any], roc) -> list:
    out: list = [Heading("OA diagnosis and severity")]
    diag = get(m, "diagnosis")
    if not isinstance(diag, Mapping) or not diag:
        out.append(Paragraph("Not available: metrics.json has no \"diagnosis\" block "
                             "(the diagnosis evaluation did not run).", "note"))
        diag = {}

    def key(k):
        s, _, a = str(k).partition("/")
        so = SOURCE_ORDER.index(s) if s in SOURCE_ORDER else len(SOURCE_ORDER)
        ao = AGGREGATOR_ORDER.index(a) if a in AGGREGATOR_ORDER else len(AGGREGATOR_ORDER)
        return so, s, ao, a
    keys = sorted((k for k in diag if isinstance(diag[k], Mapping)), key=key)
    rows, kinds = [], []
    prev = None
    for k in keys:
        d = diag[k]
        src, agg = diagnosis_label(k)
        recall = get(d, "recall") if get(d, "recall") is not None else get(d, "sensitivity")
        rows.append([src, agg, fmt(get(d, "precision")), fmt(recall), fmt(get(d, "f1")),
                     fmt_with_ci(get(d, "auc"), get(d, "auc_ci")), fmt(get(d, "severity_mae")),
                     fmt(get(d, "severity_r2"))])
        kinds.append("truth" if str(k).startswith("truth/") else ("group" if prev and prev != src else ""))
        prev = src
    for label, vals in PUBLISHED_DIAGNOSIS.items():
        rows.append([f"{label} ({PUBLISHED_LABEL})", "Transformer", *[f"{v:.3f}" for v in vals]])
        kinds.append("published")
    cols = ["Parameters from", "Aggregator", "Precision", "Recall", "F1", "AUC [95 % CI]", "Severity MAE",
            "Severity R\u00b2"]
    out.append(Table(cols, rows, row_kinds=kinds, align=["L", "L"] + ["R"] * 6,
                     caption="Patient-level OA diagnosis and severity, all inputs and aggregators "
                             "(format of the journal paper's Table 6)",
                     notes=["Published rows: journal Table 6, clinical cohort, all with Transformer aggregation; "
                            "their severity is the MOAKS score, ours the " +
                            ("phantom's severity. Phantom-truth rows (green) use the true microstructure as input: "
                             "the best any parameter estimate can do." if on_phantom(m) else
                             "severity in the cohort's labels."),
                            "Published aggregator AUCs on CT-SMA parameters (journal Table 7): " +
                            ", ".join(f"{k} {v:.3f}" for k, v in PUBLISHED_AGGREGATOR_AUC.items()) + ".",
                            *_members_note(diag, keys)]))
    if keys:
        extra = []
        for k in keys:
            d = diag[k]
            src, agg = diagnosis_label(k)
            extra.append([src, agg, fmt(get(d, "accuracy")), fmt(get(d, "sensitivity")), fmt(get(d, "specificity")),
                          fmt(get(d, "brier")), fmt_int(get(d, "n")), fmt_sig(get(d, "p_auc_vs_student_baseline"), 2)])
        out.append(Table(["Parameters from", "Aggregator", "Accuracy", "Sensitivity", "Specificity", "Brier score",
                          "n", "p vs baseline"], extra, align=["L", "L"] + ["R"] * 6,
                         caption="Further classification metrics"))
    png = figures.roc_figure(roc, m)
    if png:
        out.append(Figure(png, "ROC curves of patient-level OA diagnosis (cross-validated scores). "
                               "Dotted: chance.", 0.9))
    elif roc:
        out.append(Paragraph("ROC data were given but held no usable curve (need fpr/tpr or y_true/y_score "
                             "with both classes).", "note"))
    return out


def _timing(m: Mapping[str, Any], timings: Mapping[str, Any] | None) -> list:
    out: list = [Heading("Run time per stage")]
    t = dict(get(m, "timing") or {}) if isinstance(get(m, "timing"), Mapping) else {}
    if isinstance(timings, Mapping):
        t.update(timings)
    given = as_float(t.pop("total", None))  # 'ctsma evaluate' records its whole run, more than its stages' sum
    if not t:
        return out + [Paragraph("No stage timings were recorded.", "note")]
    total = sum(v for v in (as_float(x) for x in t.values()) if v is not None)
    total = max(total, given) if given is not None else total  # not a stage: the total row, never counted twice
    rows = [[str(k).replace("_", " "), fmt_seconds(v),
             f"{100 * as_float(v) / total:.0f} %" if total and as_float(v) is not None else DASH]
            for k, v in t.items()]
    rows.append(["total", fmt_seconds(total), "100 %" if total else DASH])
    kinds = [""] * (len(rows) - 1) + ["group"]
    out.append(Table(["Stage", "Wall time", "Share"], rows, row_kinds=kinds, align=["L", "R", "R"],
                     caption="Wall-clock time of each stage (a stage that a rerun found finished shows the time of the run that computed it)"))
    return out


def _extra_figures(figures_dir) -> list:
    if figures_dir is None:
        return []
    d = Path(figures_dir)
    if not d.is_dir():
        return [Heading("Other figures"), Paragraph(f"The figures folder {d.name!r} does not exist.", "note")]
    pngs = sorted(p for p in d.iterdir() if p.suffix.lower() == ".png" and p.is_file() and not p.is_symlink())
    out: list = []
    for p in pngs[:MAX_EXTRA_FIGURES]:
        if p.stat().st_size > MAX_EXTRA_FIGURE_BYTES:
            warnings.warn(f"figure {p.name} left out of the study report: over "
                          f"{MAX_EXTRA_FIGURE_BYTES // 2**20} MiB", stacklevel=2)
            continue
        data = p.read_bytes()
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            warnings.warn(f"figure {p.name} left out of the study report: not a PNG image", stacklevel=2)
            continue
        cap_file = p.with_suffix(".txt")
        caption = cap_file.read_text(encoding="utf-8", errors="replace").strip() if cap_file.is_file() \
            else p.stem.replace("_", " ")
        out.append(Figure(data, caption, 0.8))
    if not out:
        return []
    if len(pngs) > MAX_EXTRA_FIGURES:
        out.append(Paragraph(f"{len(pngs) - MAX_EXTRA_FIGURES} more figures are in the figures folder.", "note"))
    return [PageBreak(), Heading("Other figures"), *out]


def build_study_document(metrics, *, cohort=None, predictions=None, roc=None, timings=None,
                         figures_dir=None, title: str = "CT-SMA study report") -> Document:
    """The study report as a :class:`Document` (used by :func:`write_study_report`)."""
    m = load_metrics(metrics)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc = Document(title, subtitle=f"Generated {now} by CT-SMA {__version__}", landscape=True)
    phantom = on_phantom(m)
    doc.add(Paragraph(("The numbers in this report come from the digital knee phantom, where the true "
                       "microstructure is known. " if phantom else "The numbers in this report come from the "
                       "cohort evaluated here (no phantom truth). ") + "Figures marked \"" + PUBLISHED_LABEL +
                      "\" are the published results of the method on real patients; they are shown for context, "
                      "not as a like-for-like comparison.", "note"))
    summary = _summary(m)
    if summary:
        doc.add(Heading("Summary"), *summary)
    steps = [lambda: _cohort(cohort, phantom), lambda: _registration(m), lambda: _regression(m),
             lambda: _scatter(predictions), lambda: _diagnosis(m, roc), lambda: _timing(m, timings),
             lambda: _extra_figures(figures_dir)]
    for step in progress.track(steps, "study report", total=len(steps), unit="section"):
        doc.add(*step())
    return doc


def write_study_report(metrics, out_dir, *, cohort: pd.DataFrame | None = None,
                       predictions: Mapping[str, pd.DataFrame] | None = None, roc: Mapping[str, Any] | None = None,
                       timings: Mapping[str, float] | None = None, figures_dir=None,
                       title: str = "CT-SMA study report") -> dict[str, Path]:
    """Write ``out_dir/report/study.html`` and ``out_dir/report/study.pdf``; return their paths.

    ``metrics``: the ``metrics.json`` dict (or its path). ``cohort``: the phantom manifest.
    ``predictions``: source → DataFrame of held-out patches with columns ``subject, roi, param,
    reference, predicted``. ``roc``: ``"<source>/<aggregator>"`` → ``{"fpr", "tpr"}`` or
    ``{"y_true", "y_score"}`` (dict or DataFrame). ``timings``: stage → seconds (added to
    ``metrics["timing"]``). ``figures_dir``: a folder of extra PNG figures from other stages to append.
    Both files are rendered in memory first and then written atomically, so a failure leaves no
    partial report.
    """
    doc = build_study_document(metrics, cohort=cohort, predictions=predictions, roc=roc, timings=timings,
                               figures_dir=figures_dir, title=title)
    footer = "study report \u00b7 " + ("digital phantom data" if on_phantom(load_metrics(metrics)) else
                                       "research software, not a medical device")
    html_text = render_html(doc, footer=footer)
    pdf_bytes = render_pdf(doc, footer=footer)
    report_dir = ensure_writable_dir(safe_join(out_dir, "report"))
    paths = {"html": safe_join(report_dir, "study.html"), "pdf": safe_join(report_dir, "study.pdf")}
    write_outputs({paths["html"]: html_text.encode("utf-8"), paths["pdf"]: pdf_bytes})
    return paths
