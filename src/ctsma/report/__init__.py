"""Study and patient reports (HTML + PDF) and the README snippet.

* :func:`write_study_report` → ``DIR/report/study.html`` and ``DIR/report/study.pdf``;
* :func:`write_patient_report` → ``DIR/report/patient_<subject>.pdf`` and/or ``.html`` (paths from
  :func:`patient_report_path`);
* :func:`write_readme_snippet` → ``key_table.md`` and ``key_figure.png``.

Plots use matplotlib (Agg canvas, no pyplot); PDFs are made with fpdf2 and the DejaVu fonts shipped
with matplotlib. See ``docs/report.md``.
"""

from importlib import import_module

# each name from the module that holds it, imported on first use: ``ctsma.report.format`` (the formatting helpers
# that ``ctsma evaluate`` and ``ctsma diagnose`` use too) and ``ctsma.report.paths`` (the patient reports' file
# layout, which ``ctsma infer`` uses) then do not load matplotlib and the PDF writer (~1 s)
_HOME = {"write_study_report": "study", "write_patient_report": "patient", "patient_report_path": "paths",
         "PATIENT_REPORT_FORMATS": "paths", "write_readme_snippet": "readme", "PUBLISHED_ICC": "published",
         "PUBLISHED_MEAN_ICC": "published", "PUBLISHED_DIAGNOSIS": "published", "PUBLISHED_LABEL": "published"}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOME[name]}", __name__), name)
