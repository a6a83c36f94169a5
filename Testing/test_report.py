"""Study report (HTML + PDF), patient report (PDF + HTML) and README snippet, on realistic synthetic inputs.

The inputs come from :mod:`ctsma.report.synthetic` (a metrics dict with a few nulls, held-out predictions,
ROC scores, a cohort manifest, and a small knee-like CT with ROI labels and parameter maps).
"""

from __future__ import annotations

import base64
import json
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctsma.errors import InputImageError, UserError
from ctsma.io import write_json
from ctsma.report import (PATIENT_REPORT_FORMATS, PUBLISHED_ICC, patient_report_path, synthetic, write_patient_report,
                          write_readme_snippet, write_study_report)
from ctsma.report import patient as patient_mod
from ctsma.report import study as study_mod
from ctsma.report.format import DASH, fmt_ci, fmt_sig, fmt_with_ci, safe_file_stem, unit_label
from ctsma.report.slices import coronal, display_axes

HOSTILE = '<script>alert("x")</script>'


def page_count(pdf: bytes) -> int:
    """Pages in a PDF: the /Type /Page objects, checked against the page tree's /Count."""
    pages = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf))
    counts = [int(c) for c in re.findall(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)", pdf)] or \
             [int(c) for c in re.findall(rb"/Count\s+(\d+)", pdf)]
    assert counts and max(counts) == pages, "page tree /Count disagrees with the page objects"
    return pages


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.cells: list[str] = []
        self.rows: list[list[str]] = []
        self.tables: list[list[list[str]]] = []  # the rows of each table
        self.text: list[str] = []
        self.img_src: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.rows.append([])
            if self.tables:
                self.tables[-1].append(self.rows[-1])
        if tag in ("td", "th"):
            self._cell = []
        if tag == "img":
            self.img_src.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            cell = "".join(self._cell)
            self.cells.append(cell)
            self.rows[-1].append(cell)
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse_html(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    p.close()
    return p


# -- shared synthetic inputs, rendered once -------------------------------------------------------------
@pytest.fixture(scope="module")
def metrics():
    m = synthetic.metrics()
    m["registration"][HOSTILE] = {"tre_mean_mm": None, "tre_p95_mm": float("nan"), "seconds_per_knee": 1.0}
    return m


@pytest.fixture(scope="module")
def cohort():
    c = synthetic.cohort(n=12)
    c.loc[0, "subject"] = HOSTILE
    return c


@pytest.fixture(scope="module")
def study(tmp_path_factory, metrics, cohort):
    out = tmp_path_factory.mktemp("run")
    preds = {"student_distilled": synthetic.predictions(n_patients=4)["student_distilled"]}
    paths = write_study_report(metrics, out, cohort=cohort, predictions=preds,
                               roc=synthetic.roc(), timings={"report": 4.2})
    return out, paths


@pytest.fixture(scope="module")
def knee():
    return synthetic.knee()


def _patient_kwargs(knee, **over):
    ct, rois, maps = knee
    kw = dict(ct=ct, rois=rois, maps=maps, roi_table=synthetic.roi_table(rois, maps),
              reference_ranges=synthetic.reference_ranges(), diagnosis=synthetic.diagnosis(),
              provenance=synthetic.provenance(demo=True), subject="K007")
    kw.update(over)
    return kw


# -- formatting and names --------------------------------------------------------------------------------
def test_formatting_of_missing_and_present_values():
    assert fmt_with_ci(0.81234, [0.7, 0.9]) == "0.812 [0.700, 0.900]"
    assert fmt_with_ci(0.81234, [None, None]) == "0.812"
    assert fmt_with_ci(None, [0.7, 0.9]) == DASH
    assert fmt_with_ci(float("nan"), None) == DASH
    assert fmt_ci("not a list") == DASH
    assert fmt_sig(0.0123456) == "0.0123" and fmt_sig(1.23456) == "1.23" and fmt_sig(123.456) == "123"
    assert fmt_sig(float("inf")) == DASH


@pytest.mark.parametrize("raw, expected", [("K007", "K007"), ("../../etc/passwd", "etc_passwd"),
                                           ("/abs/name", "abs_name"), ("a b\\c", "a_b_c"), (".hidden", "hidden"),
                                           ("x..y", "x.y")])
def test_subject_ids_are_sanitised_for_file_names(raw, expected):
    assert safe_file_stem(raw) == expected


@pytest.mark.parametrize("raw", ["..", "", "/", "___", "../.."])
def test_subject_ids_without_letters_are_refused(raw):
    with pytest.raises(UserError):
        safe_file_stem(raw)


def test_patient_report_path_stays_inside_the_run_folder(tmp_path):
    p = patient_report_path(tmp_path, "../../../tmp/evil")
    assert p.parent == (tmp_path / "report").resolve()
    assert p.name == "patient_tmp_evil.pdf"
    assert patient_report_path(tmp_path, "../../../tmp/evil", "html") == p.with_suffix(".html")
    with pytest.raises(UserError, match="unknown patient report format"):
        patient_report_path(tmp_path, "K007", "docx")


# -- study report ------------------------------------------------------------------------------------------
def test_study_report_files_reopen(study):
    out, paths = study
    assert paths["html"] == (out / "report" / "study.html").resolve()
    assert paths["pdf"] == (out / "report" / "study.pdf").resolve()
    pdf = paths["pdf"].read_bytes()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert 5 <= page_count(pdf) <= 12
    assert b"DejaVu" in pdf  # a Unicode font is embedded, so µ, ², ± and – render
    assert sorted(p.name for p in (out / "report").iterdir()) == ["study.html", "study.pdf"]


def test_study_html_holds_the_formatted_values(study, metrics):
    _, paths = study
    doc = parse_html(paths["html"].read_text(encoding="utf-8"))
    by_row: dict = {}
    for r in doc.rows:  # the first table holding a row with these two leading cells
        by_row.setdefault(tuple(r[:2]), r)
    reg = metrics["regression"]["student_distilled"]["BV/TV"]
    row = by_row[("BV/TV", "CT-SMA student (distilled)")]
    assert row[2] == f"{reg['icc21']:.3f} [{reg['icc21_ci'][0]:.3f}, {reg['icc21_ci'][1]:.3f}]"
    assert row[-1] == f"{PUBLISHED_ICC['BV/TV']:.3f}"  # published ICC beside ours
    truth = metrics["regression_vs_truth"]["student_distilled"]["BV/TV"]
    assert row[-3:-1] == [f"{truth['icc21']:.3f}", f"{truth['pearson_r']:.3f}"]  # phantom truth: ICC and r
    # nulls render as a dash: ct_direct Tb.N has no CI and no Pearson r
    row = by_row[("Tb.N (mm\u207b\u00b9)", "Direct CT morphometry")]
    assert row[2] == f"{metrics['regression']['ct_direct']['Tb.N']['icc21']:.3f}" and row[4] == DASH
    d = metrics["diagnosis"]["student_distilled/transformer"]
    row = by_row[("CT-SMA student (distilled)", "Transformer")]
    assert row[2:8] == [f"{d['precision']:.3f}", f"{d['sensitivity']:.3f}", f"{d['f1']:.3f}",
                        f"{d['auc']:.3f} [{d['auc_ci'][0]:.3f}, {d['auc_ci'][1]:.3f}]",
                        f"{d['severity_mae']:.3f}", f"{d['severity_r2']:.3f}"]
    assert by_row[("Direct CT morphometry", "Logistic")][7] == DASH
    further = next(t for t in doc.tables if t and t[0][-1] == "p vs baseline")   # the DeLong p beside the AUC
    p_rows = {tuple(r[:2]): r[-1] for r in further[1:]}
    assert p_rows[("CT-SMA student (distilled)", "Transformer")] == fmt_sig(d["p_auc_vs_student_baseline"], 2)
    assert p_rows[("CT student, no distillation", "Transformer")] == DASH
    pub = by_row[("CT-SMA (distilled) (published, clinical cohort)", "Transformer")]
    assert pub[2:] == ["0.863", "0.903", "0.879", "0.883", "0.893", "0.881"]
    assert ("total", "1 h 13 min") in {tuple(r[:2]) for r in doc.rows}  # timings incl. the extra stage
    reg_rows = {r[0]: r for r in doc.rows if r and r[0] in metrics["registration"]}
    assert reg_rows["rigid"][1:] == ["2.41", "4.90", "3.20"]
    assert reg_rows[HOSTILE][1:] == [DASH, DASH, "1.00"]


def test_study_html_escapes_strings_and_is_self_contained(study):
    _, paths = study
    text = paths["html"].read_text(encoding="utf-8")
    doc = parse_html(text)
    assert "script" not in doc.tags  # the hostile subject and variant names stayed text
    assert HOSTILE not in text and html_escaped(HOSTILE) in text
    assert any(HOSTILE in t for t in doc.text)
    assert len(doc.img_src) == 3 and all(s.startswith("data:image/png;base64,") for s in doc.img_src)
    assert "href=\"http" not in text and "src=\"http" not in text


def html_escaped(s: str) -> str:
    import html
    return html.escape(s, quote=True)


def test_study_report_with_missing_blocks_does_not_crash(tmp_path):
    paths = write_study_report({}, tmp_path)
    text = paths["html"].read_text(encoding="utf-8")
    for section in ("registration", "regression", "diagnosis"):
        assert f"no &quot;{section}&quot; block" in text
    assert "No held-out predictions" in text and "No stage timings" in text
    assert page_count(paths["pdf"].read_bytes()) == 2
    # published rows are shown even without our diagnosis
    assert "CNN on MR (upper reference) (published, clinical cohort)" in text


def test_study_report_from_json_with_nulls_and_odd_inputs(tmp_path):
    m = synthetic.metrics()
    m.pop("regression")
    m["diagnosis"] = {"student_distilled/transformer": {k: float("nan") for k in ("auc", "f1", "brier")}}
    m["distillation_gain"] = {"mean_icc21_diff": None, "ci": None}
    write_json(tmp_path / "metrics.json", m)  # NaN -> null, as the evaluation writes it
    assert json.loads((tmp_path / "metrics.json").read_text())["diagnosis"]["student_distilled/transformer"]["auc"] is None
    empty = pd.DataFrame(columns=["subject", "roi", "param", "reference", "predicted"])
    roc = {"student_distilled/transformer": {"y_true": [1, 1, 1], "y_score": [0.2, 0.5, 0.9]}}  # one class only
    paths = write_study_report(tmp_path / "metrics.json", tmp_path, predictions={"student_distilled": empty},
                               roc=roc, cohort=pd.DataFrame({"subject": ["a"]}))
    doc = parse_html(paths["html"].read_text(encoding="utf-8"))
    assert "only agreement with the phantom's truth is shown" in "".join(doc.text)
    assert "held no usable curve" in "".join(doc.text)
    row = [r for r in doc.rows if r[:2] == ["CT-SMA student (distilled)", "Transformer"]][0]
    assert row[2:] == [DASH] * 6


def test_study_report_bad_metrics_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_study_report(tmp_path / "missing.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        write_study_report(tmp_path / "bad.json", tmp_path)


def test_study_report_includes_extra_figures_inside_the_html(tmp_path, study):
    figs = tmp_path / "figs"
    figs.mkdir()
    png = synthetic_png()
    (figs / "registration_overlay.png").write_bytes(png)
    (figs / "registration_overlay.txt").write_text("Registration <overlay> caption")
    (figs / "not_a_png.png").write_bytes(b"GIF89a....")
    with pytest.warns(UserWarning, match="not_a_png.png left out of the study report: not a PNG image"):
        doc = study_mod.build_study_document({}, figures_dir=figs)
    captions = [b.caption for b in doc.blocks if type(b).__name__ == "Figure"]
    assert captions == ["Registration <overlay> caption"]


def synthetic_png() -> bytes:
    from ctsma.report.figures import new_figure, to_png
    fig = new_figure(2, 1)
    fig.add_subplot().plot([0, 1], [0, 1])
    return to_png(fig, dpi=50)


def test_failed_study_report_leaves_no_files(tmp_path, monkeypatch, metrics):
    def boom(*a, **k):
        raise RuntimeError("forced failure while rendering the PDF")
    monkeypatch.setattr(study_mod, "render_pdf", boom)
    with pytest.raises(RuntimeError, match="forced"):
        write_study_report(metrics, tmp_path)
    assert not (tmp_path / "report").exists() or list((tmp_path / "report").iterdir()) == []


def test_a_folder_in_the_way_of_the_second_file_stops_before_the_first(tmp_path):
    (tmp_path / "report" / "study.pdf").mkdir(parents=True)  # the PDF cannot replace a folder
    with pytest.raises(UserError, match="is a folder"):
        write_study_report({}, tmp_path)
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["study.pdf"]
    assert (tmp_path / "report" / "study.pdf").is_dir()


# -- patient report ----------------------------------------------------------------------------------------
def test_patient_report_reopens_with_expected_pages(tmp_path, knee):
    path = patient_report_path(tmp_path, "K007")
    assert write_patient_report(path, **_patient_kwargs(knee)) == path
    pdf = path.read_bytes()
    assert pdf.startswith(b"%PDF-") and page_count(pdf) == 3
    assert [p.name for p in path.parent.iterdir()] == ["patient_K007.pdf"]


def test_patient_report_demo_notice_and_z_scores(knee, monkeypatch):
    for name in ("maps_figure", "overview_figure"):  # the text is what matters here; skip drawing
        monkeypatch.setattr(patient_mod.patient_figures, name, lambda *a, **k: None)
    doc = patient_mod.build_patient_document(**_patient_kwargs(knee))
    paras = [b.text for b in doc.blocks if type(b).__name__ == "Paragraph"]
    assert patient_mod.DEMO_NOTICE in paras
    doc2 = patient_mod.build_patient_document(**_patient_kwargs(knee, provenance=synthetic.provenance(demo=False)))
    assert patient_mod.DEMO_NOTICE not in [b.text for b in doc2.blocks if type(b).__name__ == "Paragraph"]
    roi = pd.DataFrame([("MFC", "BV/TV", 0.30, 0.02, 0.29, 0.03, 40), ("MFC", "Tb.Th", 0.10, 0.01, 0.1, 0.01, 40),
                        ("LTP", "Tb.N", 1.5, 0.1, 1.5, 0.1, 40)], columns=list(patient_mod.ROI_TABLE_COLUMNS))
    ref = pd.DataFrame([("MFC", "BV/TV", 0.25, 0.02), ("MFC", "Tb.Th", 0.14, 0.01)],
                       columns=["roi", "parameter", "mean", "sd"])
    table = [b for b in patient_mod._roi_section(roi, ref) if type(b).__name__ == "Table"][0]
    assert [r[7:] for r in table.rows] == [["+2.50", "above range"], ["-4.00", "below range"], [DASH, DASH]]
    assert table.rows[0][2] == "0.300 \u00b1 0.0200"


def test_patient_report_with_missing_parts(tmp_path, knee):
    ct, rois, _ = knee
    path = tmp_path / "p.pdf"
    write_patient_report(path, ct=ct, rois=rois, maps={}, roi_table=None, reference_ranges=None, diagnosis=None,
                         provenance=None)
    assert page_count(path.read_bytes()) == 2
    empty_rois = sitk.Image(rois.GetSize(), rois.GetPixelID())
    empty_rois.CopyInformation(rois)
    write_patient_report(path, ct=ct, rois=empty_rois, maps={}, roi_table=None, reference_ranges=None,
                         diagnosis={"oa_probability": None}, provenance={})
    assert path.read_bytes().startswith(b"%PDF-")


def test_patient_report_user_errors(tmp_path, knee):
    ct, rois, maps = knee
    with pytest.raises(UserError, match="must end in .pdf or .html"):
        write_patient_report(tmp_path / "p.htm", **_patient_kwargs(knee))
    with pytest.raises(UserError, match="must end in .html"):
        write_patient_report({"pdf": tmp_path / "p.pdf", "html": tmp_path / "p.pdf"}, **_patient_kwargs(knee))
    with pytest.raises(UserError, match="unknown patient report format"):
        write_patient_report({"docx": tmp_path / "p.docx"}, **_patient_kwargs(knee))
    with pytest.raises(UserError, match="no patient report format"):
        write_patient_report({}, **_patient_kwargs(knee))
    shifted = sitk.Image(rois)
    shifted.SetOrigin((1.0, 2.0, 3.0))
    with pytest.raises(InputImageError, match="geometry"):
        write_patient_report(tmp_path / "p.pdf", **_patient_kwargs(knee, rois=shifted))
    with pytest.raises(UserError, match="lacks the columns"):
        write_patient_report(tmp_path / "p.pdf", **_patient_kwargs(knee, roi_table=pd.DataFrame({"roi": ["MFC"]})))
    assert not list(tmp_path.iterdir())


def test_failed_patient_report_leaves_no_partial_file(tmp_path, knee, monkeypatch):
    path = patient_report_path(tmp_path, "K007")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"%PDF-1.3 previous report")
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("forced failure while drawing maps")
    monkeypatch.setattr(patient_mod.patient_figures, "maps_figure", boom)
    with pytest.raises(RuntimeError, match="forced"):
        write_patient_report(path, **_patient_kwargs(knee))
    assert path.read_bytes() == before  # the previous report is untouched
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# -- patient report as HTML: the same document as the PDF, rendered by html_render ---------------------------
@pytest.fixture(scope="module")
def patient_pair(tmp_path_factory, knee):
    """Both formats of one report, for a demo model, with a hostile subject ID and provenance text."""
    out = tmp_path_factory.mktemp("patient")
    paths = {f: patient_report_path(out, HOSTILE, f) for f in PATIENT_REPORT_FORMATS}
    prov = dict(synthetic.provenance(demo=True), trained_on=HOSTILE)
    kw = _patient_kwargs(knee, subject=HOSTILE, provenance=prov)
    assert write_patient_report(paths, **kw) == paths
    return paths, kw


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_patient_report_pdf_and_html_are_written_side_by_side(patient_pair):
    paths, _ = patient_pair
    assert paths["pdf"].name == "patient_script_alert_x_script.pdf"
    assert paths["html"] == paths["pdf"].with_suffix(".html")
    assert sorted(p.name for p in paths["pdf"].parent.iterdir()) == sorted(p.name for p in paths.values())
    assert page_count(paths["pdf"].read_bytes()) == 3
    text = paths["html"].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</body></html>")
    assert '<tr class="group shade">' in text  # row groups shaded as in the PDF ("Shaded: ..." notes hold)


def test_patient_html_holds_the_roi_table_of_the_pdf(patient_pair, monkeypatch):
    paths, kw = patient_pair
    doc = parse_html(paths["html"].read_text(encoding="utf-8"))
    roi = [t for t in doc.tables if t and "z-score" in t[0]]
    assert len(roi) == 1
    head, *rows = roi[0]
    assert head[:2] == ["ROI", "Parameter"] and len(rows) == 16
    rois, last = [], ""
    for r in rows:
        last = r[0] or last
        rois.append(last)
    assert sorted(set(rois)) == sorted(["MFC", "LFC", "MTP", "LTP"]) and all(rois.count(r) == 4 for r in set(rois))
    assert {r[1] for r in rows} == {unit_label(p) for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")}
    assert all(re.fullmatch(r"[+-]\d+\.\d\d", r[7]) for r in rows)  # every ROI and parameter has a z-score
    # the same rows as the document the PDF is rendered from (figures skipped: only the table is compared)
    for name in ("maps_figure", "overview_figure"):
        monkeypatch.setattr(patient_mod.patient_figures, name, lambda *a, **k: None)
    table = [b for b in patient_mod.build_patient_document(**kw).blocks
             if type(b).__name__ == "Table" and "z-score" in b.columns][0]
    assert rows == [list(r) for r in table.rows]
    assert ["OA probability", "73 %"] in doc.rows and ["Cross-validated AUC", "0.870 [0.790, 0.930]"] in doc.rows


def test_patient_html_is_self_contained_with_png_figures(patient_pair):
    paths, _ = patient_pair
    text = paths["html"].read_text(encoding="utf-8")
    doc = parse_html(text)
    assert len(doc.img_src) == 3  # probability bar, ROI overview, parameter maps
    for src in doc.img_src:
        assert src.startswith("data:image/png;base64,")
        w, h = _png_size(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert w > 50 and h > 20
    assert re.search(r'(?:src|href)\s*=\s*"(?!data:image/png;base64,|#)', text) is None
    assert not {"script", "link", "iframe", "object"} & set(doc.tags)
    assert "url(" not in text and "@import" not in text


def test_patient_html_escapes_user_strings_and_shows_the_demo_notice(patient_pair, knee, tmp_path, monkeypatch):
    paths, kw = patient_pair
    text = paths["html"].read_text(encoding="utf-8")
    doc = parse_html(text)
    assert "script" not in doc.tags and HOSTILE not in text and html_escaped(HOSTILE) in text
    assert f"Subject {HOSTILE}" in "".join(doc.text)  # the subtitle shows the ID as text
    assert ["Trained on", HOSTILE] in doc.rows  # provenance
    body = "".join(doc.text)
    assert patient_mod.DEMO_NOTICE in body and '<p class="warning">NOT FOR CLINICAL USE.' in text
    assert "DEMO MODEL \u2013 NOT FOR CLINICAL USE" in body  # the footer, as on every PDF page
    # a non-demo model: no notice, the research-software footer
    for name in ("maps_figure", "overview_figure"):
        monkeypatch.setattr(patient_mod.patient_figures, name, lambda *a, **k: None)
    out = write_patient_report(tmp_path / "p.html", **dict(kw, provenance=synthetic.provenance(demo=False)))
    assert out == tmp_path / "p.html" and [p.name for p in tmp_path.iterdir()] == ["p.html"]
    body = "".join(parse_html(out.read_text(encoding="utf-8")).text)
    assert "NOT FOR CLINICAL USE" not in body and patient_mod.RESEARCH_NOTICE in body


def test_failed_patient_html_leaves_the_previous_pair_untouched(tmp_path, knee, monkeypatch):
    paths = {f: patient_report_path(tmp_path, "K007", f) for f in PATIENT_REPORT_FORMATS}
    paths["pdf"].parent.mkdir(parents=True)
    before = {f: f"previous {f} report".encode() for f in paths}
    for f, p in paths.items():
        p.write_bytes(before[f])
    for name in ("maps_figure", "overview_figure"):
        monkeypatch.setattr(patient_mod.patient_figures, name, lambda *a, **k: None)

    def boom(*a, **k):
        raise RuntimeError("forced failure while rendering the HTML")
    monkeypatch.setattr(patient_mod, "render_html", boom)
    with pytest.raises(RuntimeError, match="forced"):
        write_patient_report(paths, **_patient_kwargs(knee))
    assert {f: p.read_bytes() for f, p in paths.items()} == before
    assert sorted(p.name for p in paths["pdf"].parent.iterdir()) == sorted(p.name for p in paths.values())


def test_maps_on_another_grid_are_resampled(tmp_path, knee):
    ct, rois, maps = knee
    coarse = {p: sitk.Resample(m, [s // 2 for s in m.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                               m.GetOrigin(), [2 * s for s in m.GetSpacing()], m.GetDirection(), float("nan"))
              for p, m in maps.items()}
    from ctsma.report.patient_figures import maps_figure
    assert maps_figure(ct, rois, coarse)[:8] == b"\x89PNG\r\n\x1a\n"


# -- display orientation -------------------------------------------------------------------------------------
def test_coronal_slices_do_not_depend_on_the_storage_order():
    """The same physical volume stored with flipped and permuted axes gives the same coronal view."""
    rng = np.random.default_rng(1)
    a = rng.random((5, 6, 7)).astype(np.float32)  # (z, y, x), identity direction
    img = sitk.GetImageFromArray(a)
    ref = coronal(a, display_axes(img), 2)
    # superior at the top, patient's right (smaller LPS x) on the left
    assert np.array_equal(ref, a[::-1, 2, :])
    # x flipped in storage: index i runs toward the patient's right
    b = a[:, :, ::-1]
    img_b = sitk.GetImageFromArray(np.ascontiguousarray(b))
    img_b.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert np.array_equal(coronal(b, display_axes(img_b), 2), ref)
    # axes permuted: index axis 0 is S, 1 is L, 2 is P  -> array (P, L, S) order is (z, y, x) = (P, L, S)
    c = np.transpose(a, (1, 2, 0))  # array axes now (y=P, x=L, z=S) in (z, y, x) storage order
    img_c = sitk.GetImageFromArray(np.ascontiguousarray(c))
    img_c.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))
    assert np.array_equal(coronal(c, display_axes(img_c), 2), ref)


# -- README snippet ----------------------------------------------------------------------------------------------
def test_readme_snippet(tmp_path, metrics):
    paths = write_readme_snippet(metrics, tmp_path / "readme")
    md = paths["table"].read_text(encoding="utf-8")
    r = metrics["regression"]["student_distilled"]["Tb.Sp"]
    assert f"| Tb.Sp (mm) | {r['icc21']:.3f} [{r['icc21_ci'][0]:.3f}, {r['icc21_ci'][1]:.3f}] |" in md
    assert md.count("| mean |") == 1 and "0.742 |" in md
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hostile = {"diagnosis": {"a|b<i>/mlp": {"auc": 0.5}}}
    p2 = write_readme_snippet(hostile, tmp_path / "r2")
    md2 = p2["table"].read_text(encoding="utf-8")
    assert "a\\|b&lt;i&gt;, MLP | 0.500 |" in md2 and p2["figure"] is None
    assert not (tmp_path / "r2" / "key_figure.png").exists()


def test_patient_diagnosis_table_shows_readable_rows_only(tmp_path, knee):
    """The diagnosis record of the demo (as `infer` writes it) carries bookkeeping keys; the report hides them."""
    from ctsma.report.patient import _diagnosis_section, _performance_section

    dx = {"oa_probability": 0.2, "severity": 0.35, "auc": 0.932, "auc_ci": [0.83, 1.0], "auc_se": 0.053,
          "auc_ci_method": "DeLong", "precision": 0.9, "recall": 0.9, "n": 23, "n_oa": 11, "folds": 5, "seed": 0,
          "seconds": 4.7, "auc_diff_vs_student_baseline": 0.02, "p_auc_vs_student_baseline": 0.3}
    result = next(b for b in _diagnosis_section(dx) if hasattr(b, "rows"))
    assert [r[0] for r in result.rows] == ["OA probability", "Severity (model estimate)", "Cross-validated AUC"]
    assert result.rows[0][1] == "20 %" and result.row_kinds == ["", "", "group"]  # the AUC shaded as the model's
    performance = [b for b in _performance_section(dx) if hasattr(b, "rows")]
    labels = {r[0]: r[1] for r in performance[0].rows}
    wanted = {"Precision", "Recall", "Patients in the cross-validation", "of which OA", "Cross-validation folds"}
    assert wanted <= set(labels) and "OA probability" not in labels
    assert labels["Cross-validation folds"] == "5" and labels["Patients in the cross-validation"] == "23"
    assert not any(k in " ".join(labels) for k in ("seed", "auc se", "seconds", "p auc", "auc diff", "method"))
    # a record with nothing beyond the AUC needs no performance section, nor a pointer to one
    assert _performance_section({"oa_probability": 0.2, "auc": 0.9}) == []
    only_auc = next(b for b in _diagnosis_section({"oa_probability": 0.2, "auc": 0.9}) if hasattr(b, "rows"))
    assert "Diagnosis model performance" not in only_auc.notes[0]


def test_a_heading_stays_with_the_short_table_after_it():
    """A heading never ends a page: before a short table it moves to the next page with the whole table, before
    a long one with its first rows; a table of one row fits where the other did not."""
    from ctsma.report.document import Table
    from ctsma.report.pdf_render import ReportPDF

    short = Table(["Item", "Value"], [[f"row {i}", "x"] for i in range(7)])
    tiny = Table(["Item", "Value"], [["row", "x"]])
    for block, page in ((short, 2), (tiny, 1)):
        pdf = ReportPDF("t")
        pdf.add_page()
        pdf.set_y(pdf.page_break_trigger - 50)   # room for a heading and a few rows, not for seven
        pdf.heading("Model provenance", keep_with=pdf.keep_need(block))
        assert pdf.page == page
    long = Table(["Item", "Value"], [[f"row {i}", "x"] for i in range(40)])
    pdf = ReportPDF("t")
    assert pdf.keep_need(long) < pdf.keep_need(short) < pdf.page_break_trigger


def test_patient_report_of_a_phantom_trained_model_says_not_for_clinical_use():
    """A student whose training store measured the phantom's truth is a demonstration model wherever it came from
    (`ctsma demo`, or a user's own training on the phantom), and its report says so."""
    from ctsma.models.export import describe, trained_on_phantom
    from ctsma.report.patient import inputs_from_summary, is_demo

    def meta(source):
        return {"training": {"store_summary": {"n_subjects": 3, "attrs": {"subject_info": {
            "P0000": {"true_source": source}, "P0001": {"true_source": source}}}}}}

    phantom = meta("phantom truth_binary, central 4-mm cube at 0.0625 mm, 1 patches per ROI")
    assert trained_on_phantom(phantom) and describe(phantom)["trained_on_phantom"]
    assert not trained_on_phantom(meta("manifest per-ROI truth")) and not trained_on_phantom(meta(""))
    assert not trained_on_phantom({}) and not trained_on_phantom({"training": {"store_summary": None}})
    prov = inputs_from_summary({"model": {"path": "m.safetensors", "trained_on": 3, "trained_on_phantom": True,
                                          "demo": True}})["provenance"]
    assert is_demo(prov) and prov["trained_on"] == "3 phantom knees"


def test_patient_report_lists_the_analysis_notes(knee, monkeypatch):
    for name in ("maps_figure", "overview_figure"):
        monkeypatch.setattr(patient_mod.patient_figures, name, lambda *a, **k: None)
    summary = {"warnings": ["knee side R inferred from the shape of the proximal tibia"],
               "ct_resolution": {"inplane_edge_sigma_mm": 0.12, "model_inplane_edge_sigma_mm": 0.31,
                                 "harmonisation_blur_mm": 0.285}}
    notes = patient_mod.analysis_notes(summary)
    assert notes[0] == "Knee side R inferred from the shape of the proximal tibia."   # a report sentence
    assert "blurred in-plane by 0.285 mm" in notes[1]
    assert patient_mod.analysis_notes({"warnings": ["the CT is softer (docs/inference.md, 'Other scanners')"]}) \
        == ["The CT is softer."]                                                        # no pointer into the docs
    assert "0.120 mm against 0.310 mm" in notes[1]
    # the target allowing for pixel sizes, and a blur along z for thinner slices
    more = patient_mod.analysis_notes({"ct_resolution": {
        "inplane_edge_sigma_mm": 0.26, "model_inplane_edge_sigma_mm": 0.31, "target_inplane_edge_sigma_mm": 0.36,
        "harmonisation_blur_mm": 0.25, "slice_thickness_mm": 0.7, "model_slice_thickness_mm": 1.0,
        "through_plane_blur_mm": 0.42}})
    assert len(more) == 2 and "0.260 mm against 0.360 mm" in more[0]
    assert "(0.700 mm against 1.00 mm)" in more[1] and "blurred along z by 0.420 mm" in more[1]
    ref = {"inplane_edge_sigma_mm": 0.309, "inplane_spacing_mm": 0.6, "slice_spacing_mm": 1.0}
    prov = patient_mod.inputs_from_summary({"model": {"path": "m", "input": {"ct_reference": ref}}})["provenance"]
    assert prov["training CTs"] == "in-plane edge sigma 0.309 mm, pixels 0.600 mm, slices 1.00 mm thick, 1.00 mm apart"
    doc = patient_mod.build_patient_document(**_patient_kwargs(knee), notes=notes)
    heads = [b.text for b in doc.blocks if type(b).__name__ == "Heading"]
    paras = [b.text for b in doc.blocks if type(b).__name__ == "Paragraph"]
    assert "Analysis notes" in heads and all(n in paras for n in notes)
    # nothing to note: no section
    assert patient_mod.analysis_notes({"warnings": [], "ct_resolution": {"harmonisation_blur_mm": 0.0}}) == []
    assert patient_mod.analysis_notes(None) == []
    assert patient_mod.analysis_notes({"oa_probability": None, "diagnosis": {"message": "the knee has no valid "
                                       "patches"}}) == ["No OA probability: the knee has no valid patches."]
    doc = patient_mod.build_patient_document(**_patient_kwargs(knee), notes=[])
    assert "Analysis notes" not in [b.text for b in doc.blocks if type(b).__name__ == "Heading"]


def test_study_report_states_the_flips_and_the_ensemble_sizes(tmp_path, metrics):
    """The tables' notes say how the numbers were made when metrics.json records it (evaluation flips, diagnosis
    ensemble sizes), and say nothing when it does not."""
    import copy

    m = copy.deepcopy(metrics)
    m.setdefault("regression_info", {})["flips"] = 4
    for key, block in m["diagnosis"].items():
        if key.endswith("/transformer") or key.endswith("/mlp"):
            block["config"] = {"members": 3}
        elif key.endswith("/logistic"):
            block["config"] = {"C": 1.0}
    text = write_study_report(m, tmp_path / "with")["html"].read_text(encoding="utf-8")
    assert "mean over 4 flipped copies" in text
    assert "ensembles of networks that differ only in their seed (the mean of their probabilities): " in text
    assert "Transformer 3" in text and "MLP 3" in text and "Logistic 3" not in text
    plain = copy.deepcopy(metrics)
    plain.get("regression_info", {}).pop("flips", None)
    for block in plain.get("diagnosis", {}).values():
        if isinstance(block, dict):
            block.pop("config", None)
    text = write_study_report(plain, tmp_path / "without")["html"].read_text(encoding="utf-8")
    assert "flipped copies" not in text and "ensembles of networks" not in text


def test_a_cohort_without_phantom_truth_is_not_called_phantom_data(tmp_path, metrics):
    """A user's own cohort has no truth to score against: the study report and the README snippet then speak of
    the cohort evaluated, not of the digital phantom (whose runs keep saying so). Its cohort table called the
    labels' OA 'OA (KL >= 2)', the phantom's rule, and its agreement table kept two columns of dashes 'vs phantom
    truth' with a note on the phantom's truth."""
    own = {k: v for k, v in metrics.items() if k not in ("regression_vs_truth", "distillation_gain_vs_truth", "demo")}
    cohort = synthetic.cohort(6)
    for m, phantom in ((metrics, True), (own, False)):
        out = tmp_path / ("phantom" if phantom else "own")
        paths = write_study_report(m, out, cohort=cohort)
        html = paths["html"].read_text(encoding="utf-8")
        assert ("come from the digital knee phantom" in html) is phantom
        assert ("digital phantom data" in html) is phantom and ("Phantom cohort" in html) is phantom
        assert ("cohort evaluated here (no phantom truth)" in html) is not phantom
        # its cohort table does not define OA by the phantom's KL rule, and its agreement table has no columns of
        # dashes for a truth it does not have
        assert ("OA (KL \u2265 2)" in html) is phantom and ("OA (as labelled)" in html) is not phantom
        assert ("vs phantom truth" in html) is phantom and ("near 0 for them by construction" in html) is phantom
        assert "Patients / patches" in html and "ICC, published" in html
        snippet = write_readme_snippet(m, out / "readme")["table"].read_text(encoding="utf-8")
        assert ("numbers from the digital phantom" in snippet) is phantom


def test_registration_table_says_on_how_many_knees_each_variant_was_scored():
    """The demo scores its variants on 3 of the 30 knees of the full pipeline: the table set the full pipeline's
    0.18 mm (30 knees) beside a variant's 0.27 mm (3 knees) without saying so, while on those 3 knees the full
    pipeline's TRE was 0.24 mm (metrics.json: n_knees, tre_mean_mm_variant_knees). Both are shown now."""
    from ctsma.report import study as study_mod
    from ctsma.report.document import Table

    reg = {"full": {"tre_mean_mm": 0.18, "tre_p95_mm": 0.36, "seconds_per_knee": 3.0, "n_knees": 30,
                    "n_landmarks": 600, "tre_mean_mm_variant_knees": 0.2422},
           "no_synthesis": {"tre_mean_mm": 0.27, "tre_p95_mm": 0.48, "seconds_per_knee": 3.3, "n_knees": 3,
                            "n_landmarks": 60}}
    table = next(b for b in study_mod._registration({"registration": reg}) if isinstance(b, Table))
    assert table.columns[-1] == "Knees (landmarks)"
    assert [r[-1] for r in table.rows] == ["30 (600)", "3 (60)"]
    assert any("full has a TRE mean of 0.24 mm" in n for n in table.notes)
    # without the counts (older metrics.json) the table is as before
    old = {k: {m: v[m] for m in ("tre_mean_mm", "tre_p95_mm", "seconds_per_knee")} for k, v in reg.items()}
    table = next(b for b in study_mod._registration({"registration": old}) if isinstance(b, Table))
    assert table.columns[-1] == "Seconds per knee" and len(table.notes) == 1


@pytest.mark.parametrize("landscape", [False, True])
def test_wide_tables_shrunk_to_the_page_render(landscape):
    """A table wider than the page is shrunk to it; the shrunk widths' sum can exceed the page width by a rounding
    error, which fpdf refused (the study table with the truth's Pearson r column did)."""
    from ctsma.report.document import Document, Table
    from ctsma.report.pdf_render import render_pdf
    for n in range(6, 16):
        cols = [f"column heading number {j} of {n}" for j in range(n)]
        rows = [[f"{(j + 1) * 1.2345678:.{3 + j % 4}f} [{j}.00, {j}.99]" for j in range(n)] for _ in range(3)]
        doc = Document(f"{n} columns", blocks=[Table(cols, rows, align=["R"] * n)], landscape=landscape)
        assert render_pdf(doc).startswith(b"%PDF-")


def test_study_report_counts_a_recorded_total_once():
    """`ctsma evaluate` records its stages and its whole run as `total` in metrics.json's timing: the report's total
    row is that run, not the stages plus the total again, and `total` is no stage row of its own."""
    table = next(x for x in study_mod._timing({"timing": {"prediction": 30.0, "writing": 10.0, "total": 50.0}}, None)
                 if isinstance(x, study_mod.Table))
    assert [r[:3] for r in table.rows] == [["prediction", "30.0 s", "60 %"], ["writing", "10.0 s", "20 %"],
                                           ["total", "50.0 s", "100 %"]]
    # stages given beside it that the recorded total does not hold (the caller's own): the total is their sum
    table = next(x for x in study_mod._timing({"timing": {"prediction": 30.0, "total": 35.0}}, {"report": 15.0})
                 if isinstance(x, study_mod.Table))
    assert table.rows[-1][:2] == ["total", "45.0 s"]


def test_the_patient_report_layout_has_one_definition_that_infer_uses_without_matplotlib(tmp_path):
    """`ctsma infer` removes the patient reports of the results it replaces; it repeated the report package's
    `report/patient_*` pattern so as not to import matplotlib at start-up. Both now use `ctsma.report.paths`, which
    loads neither matplotlib nor the PDF writer."""
    import subprocess
    import sys

    from ctsma.report.paths import patient_reports

    written = [patient_report_path(tmp_path, "K 7", f) for f in PATIENT_REPORT_FORMATS]
    for p in written:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    (tmp_path / "report" / "study.pdf").write_text("x")
    (tmp_path / "report" / "patient_K_7.txt").write_text("x")
    assert patient_reports(tmp_path) == sorted(written)
    code = ("import sys, pathlib; import ctsma.cli.main, ctsma.cli.infer, ctsma.inference.batch; "
            "from ctsma.inference.engine import _remove_earlier_reports; "
            f"_remove_earlier_reports(pathlib.Path({str(tmp_path)!r})); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'fpdf')))")
    import os
    from pathlib import Path

    import ctsma

    env = {**os.environ, "PYTHONPATH": str(Path(ctsma.__file__).parents[1])}  # this checkout's ctsma
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert res.stdout.strip() == "[]", res.stdout
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["patient_K_7.txt", "study.pdf"]
