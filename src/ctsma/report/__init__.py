"""Study and patient reports (HTML + PDF) and the README snippet.

* :func:`write_study_report` → ``DIR/report/study.html`` and ``DIR/report/study.pdf``;
* :func:`write_patient_report` → ``DIR/report/patient_<subject>.pdf`` and/or ``.html`` (paths from
  :func:`patient_report_path`);
* :func:`write_readme_snippet` → ``key_table.md`` and ``key_figure.png``.

Plots use matplotlib (Agg canvas, no pyplot); PDFs are made with fpdf2 and the DejaVu fonts shipped
with matplotlib. See ``docs/report.md``.
"""

from .patient import PATIENT_REPORT_FORMATS, patient_report_path, write_patient_report
from .published import PUBLISHED_DIAGNOSIS, PUBLISHED_ICC, PUBLISHED_LABEL, PUBLISHED_MEAN_ICC
from .readme import write_readme_snippet
from .study import write_study_report

__all__ = ["write_study_report", "write_patient_report", "patient_report_path", "PATIENT_REPORT_FORMATS",
           "write_readme_snippet", "PUBLISHED_ICC", "PUBLISHED_MEAN_ICC", "PUBLISHED_DIAGNOSIS", "PUBLISHED_LABEL"]
