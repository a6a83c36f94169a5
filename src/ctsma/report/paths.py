"""Where the patient reports lie: ``DIR/report/patient_<subject>.<format>``.

The one definition of that layout, for ``ctsma report patient``, the demo, and ``ctsma infer``, which removes the
reports of results it replaces. Light on purpose: importing it loads neither matplotlib nor the PDF writer, so
``infer`` starts as fast as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import safe_join
from .format import safe_file_stem

PATIENT_REPORT_FORMATS = ("pdf", "html")
"""The formats of the patient report; each is written as ``patient_<subject>.<format>``."""
REPORT_FOLDER = "report"
PATIENT_REPORT_PREFIX = "patient_"


def _check_format(fmt: Any) -> str:
    if fmt not in PATIENT_REPORT_FORMATS:
        raise UserError(f"unknown patient report format {fmt!r}; expected one of {', '.join(PATIENT_REPORT_FORMATS)}")
    return fmt


def patient_report_path(run_dir, subject: Any, fmt: str = "pdf") -> Path:
    """``run_dir/report/patient_<subject>.<fmt>`` (``fmt``: ``pdf`` or ``html``) with the subject ID sanitised
    and kept inside ``run_dir``."""
    return safe_join(run_dir, REPORT_FOLDER, f"{PATIENT_REPORT_PREFIX}{safe_file_stem(subject)}.{_check_format(fmt)}")


def patient_reports(run_dir) -> list[Path]:
    """The patient report files in ``run_dir/report`` (every subject and format), sorted."""
    folder = Path(run_dir) / REPORT_FOLDER
    return [f for f in sorted(folder.glob(f"{PATIENT_REPORT_PREFIX}*"))
            if f.suffix in tuple(f".{x}" for x in PATIENT_REPORT_FORMATS) and f.is_file()]
