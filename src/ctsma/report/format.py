"""Formatting helpers shared by the study and patient reports.

Every value from ``metrics.json`` may be ``null``/NaN or missing; these helpers turn such values
into an en dash ("–") instead of failing, so that a report renders whatever stages have run.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from .. import PARAMETER_UNITS
from ..errors import UserError

DASH = "\u2013"
"""Shown for a missing or non-finite value."""

SOURCE_LABELS = {
    "teacher": "Teacher (CNN on MR)",
    "student_distilled": "CT-SMA student (distilled)",
    "student_baseline": "CT student, no distillation",
    "ct_direct": "Direct CT morphometry",
    "mr_reference": "MR reference parameters",
    "radiomics": "Radiomics on CT",
    "truth": "Phantom truth",
}
"""Readable names of the parameter sources used as keys in ``metrics.json``."""

AGGREGATOR_LABELS = {"transformer": "Transformer", "mlp": "MLP", "cnn": "CNN", "logistic": "Logistic",
                     "mean": "Mean", "gbm": "Gradient boosting", "rf": "Random forest"}


def source_label(key: str) -> str:
    """Readable name of a source key (``student_distilled`` → "CT-SMA student (distilled)")."""
    return SOURCE_LABELS.get(key, str(key).replace("_", " "))


def diagnosis_label(key: str) -> tuple[str, str]:
    """Split a ``"<source>/<aggregator>"`` key into readable (source, aggregator) names."""
    src, _, agg = str(key).partition("/")
    return source_label(src), AGGREGATOR_LABELS.get(agg, agg or DASH)


def as_float(x: Any) -> float | None:
    """``x`` as a finite float, or ``None`` (for None, NaN, inf, strings, lists ...)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3) -> str:
    """Fixed-point with ``digits`` decimals; "–" when missing."""
    v = as_float(x)
    return DASH if v is None else f"{v:.{digits}f}"


def fmt_sig(x: Any, sig: int = 3) -> str:
    """About ``sig`` significant figures without exponent notation (0.0123, 1.23, 123); "–" when missing."""
    v = as_float(x)
    if v is None:
        return DASH
    if v == 0:
        return "0"
    decimals = max(0, min(6, sig - 1 - int(math.floor(math.log10(abs(v))))))
    return f"{v:.{decimals}f}"


def fmt_int(x: Any) -> str:
    v = as_float(x)
    return DASH if v is None else f"{int(round(v)):d}"


def fmt_ci(ci: Any, digits: int = 3, *, sig: bool = False) -> str:
    """``[lo, hi]`` as "[lo, hi]"; "–" when missing or malformed."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return DASH
    f = (lambda v: fmt_sig(v, digits)) if sig else (lambda v: fmt(v, digits))
    lo, hi = f(ci[0]), f(ci[1])
    return DASH if lo == DASH and hi == DASH else f"[{lo}, {hi}]"


def fmt_with_ci(x: Any, ci: Any, digits: int = 3) -> str:
    """"0.812 [0.701, 0.880]"; the value alone when the interval is missing."""
    s = fmt(x, digits)
    c = fmt_ci(ci, digits)
    return s if c == DASH or s == DASH else f"{s} {c}"


def fmt_seconds(x: Any) -> str:
    """Durations: "12.3 s", "4 min 05 s", "1 h 02 min"."""
    v = as_float(x)
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.1f} s"
    if v < 3600:
        m, s = divmod(int(round(v)), 60)
        return f"{m} min {s:02d} s"
    h, rem = divmod(int(round(v)), 3600)
    return f"{h} h {rem // 60:02d} min"


def unit_label(param: str) -> str:
    """Axis/column label of a parameter with its unit: "Tb.Th (mm)", "BV/TV"."""
    unit = PARAMETER_UNITS.get(param, "")
    unit = {"1/mm": "mm\u207b\u00b9", "1/mm^3": "mm\u207b\u00b3"}.get(unit, unit)
    return f"{param} ({unit})" if unit else param


def get(d: Any, *keys: str) -> Any:
    """Nested lookup that returns ``None`` for anything missing or of the wrong type."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_stem(name: Any, *, max_len: int = 80) -> str:
    """A subject ID made safe for a file name: only letters, digits, ``.``, ``_`` and ``-``.

    Separators and other characters become ``_``; runs of dots collapse to one and dots, ``_``
    and ``-`` are stripped from both ends (no hidden files, no ``..``). Raises :class:`UserError` when nothing usable is left.
    """
    s = re.sub(r"\.{2,}", ".", _SAFE_CHARS.sub("_", str(name)))
    s = s.strip("._-")[:max_len].strip("._-")
    if not s or not re.search(r"[A-Za-z0-9]", s):
        raise UserError(f"subject ID {str(name)!r} has no letters or digits to name a report file; "
                        "use an ID made of letters, digits, '-' or '_'")
    return s
