"""Agreement between a measurement and a reference: ICC, Pearson r, MAE, Bland–Altman.

ICC follows Shrout & Fleiss (1979) and McGraw & Wong (1996) from the two-way ANOVA mean squares of
an ``n subjects × k raters`` table:

- ICC(2,1): two-way random effects, absolute agreement, single measurement (McGraw & Wong ICC(A,1));
- ICC(3,1): two-way mixed effects, consistency, single measurement (McGraw & Wong ICC(C,1)).

The 95 % confidence intervals are the F-distribution intervals of McGraw & Wong (1996, Table 7);
for ICC(2,1) the approximate (Satterthwaite) denominator degrees of freedom are used. These are
hand-written (a few lines of ANOVA) so that no optional package is needed at run time; the tests
check them against ``pingouin.intraclass_corr``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._scipy import scipy_stats as _st


@dataclass(frozen=True)
class ICCResult:
    """One ICC with its CI, F statistic and p-value (H0: ICC = 0)."""

    kind: str
    value: float
    ci: tuple[float, float]
    F: float
    df1: float
    df2: float
    p: float
    n: int
    k: int


def _as_table(ratings, y=None) -> np.ndarray:
    a = np.asarray(ratings, dtype=float)
    if y is not None:
        a = np.column_stack([np.ravel(a), np.ravel(np.asarray(y, dtype=float))])
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError("ICC needs an (n subjects × k ≥ 2 raters) table, or two equally long arrays")
    a = a[np.all(np.isfinite(a), axis=1)]  # listwise deletion of incomplete subjects
    if a.shape[0] < 3:
        raise ValueError(f"ICC needs at least 3 complete subjects, got {a.shape[0]}")
    return a


def _mean_squares(a: np.ndarray) -> tuple[float, float, float]:
    n, k = a.shape
    grand = a.mean()
    ss_rows = k * np.sum((a.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((a.mean(axis=0) - grand) ** 2)
    ss_err = np.sum((a - grand) ** 2) - ss_rows - ss_cols
    return ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))


def _icc_value(kind: str, msr, msc, mse, n: int, k: int):
    if kind == "3,1":
        return (msr - mse) / (msr + (k - 1) * mse)
    if kind == "2,1":
        return (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    raise ValueError(f"unknown ICC kind {kind!r}; use '2,1' or '3,1'")


def icc_value(ratings, y=None, *, kind: str = "2,1") -> float:
    """:func:`icc`'s value alone, the same number, without the confidence interval and p-value (whose F-distribution
    quantiles take most of the time): for bootstraps, which recompute the ICC thousands of times."""
    a = _as_table(ratings, y)
    n, k = a.shape
    msr, msc, mse = _mean_squares(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(_icc_value(kind, msr, msc, mse, n, k))


def icc(ratings, y=None, *, kind: str = "2,1", alpha: float = 0.05) -> ICCResult:
    """ICC of an ``(n, k)`` table (or of two arrays ``ratings`` and ``y``), ``kind`` "2,1" or "3,1".

    Subjects with any missing (non-finite) rating are dropped. A degenerate table (no variance at
    all) gives NaN.
    """
    a = _as_table(ratings, y)
    n, k = a.shape
    msr, msc, mse = _mean_squares(a)
    df1, df2 = n - 1, (n - 1) * (k - 1)
    q = 1 - alpha / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        F = msr / mse
        p = float(_st().f.sf(F, df1, df2))
        value = _icc_value(kind, msr, msc, mse, n, k)
        if kind == "3,1":
            fl = F / _st().f.ppf(q, df1, df2)
            fu = F * _st().f.ppf(q, df2, df1)
            ci = ((fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1))
        else:  # "2,1" (_icc_value refused any other kind)
            aa = k * value / (n * (1 - value))
            bb = 1 + k * value * (n - 1) / (n * (1 - value))
            v = (aa * msc + bb * mse) ** 2 / ((aa * msc) ** 2 / (k - 1) + (bb * mse) ** 2 / df2)
            fs = _st().f.ppf(q, df1, v)
            lo = n * (msr - fs * mse) / (fs * (k * msc + (k * n - k - n) * mse) + n * msr)
            fs2 = _st().f.ppf(q, v, df1)
            hi = n * (fs2 * msr - mse) / (k * msc + (k * n - k - n) * mse + n * fs2 * msr)
            ci = (lo, hi)
    return ICCResult(kind, float(value), (float(ci[0]), float(ci[1])), float(F), float(df1), float(df2), p, n, k)


def icc21(reference, measured, alpha: float = 0.05) -> ICCResult:
    """ICC(2,1), absolute agreement, of two paired arrays."""
    return icc(reference, measured, kind="2,1", alpha=alpha)


def icc31(reference, measured, alpha: float = 0.05) -> ICCResult:
    """ICC(3,1), consistency, of two paired arrays."""
    return icc(reference, measured, kind="3,1", alpha=alpha)


def _pair(reference, measured) -> tuple[np.ndarray, np.ndarray]:
    r = np.ravel(np.asarray(reference, dtype=float))
    m = np.ravel(np.asarray(measured, dtype=float))
    if r.shape != m.shape:
        raise ValueError(f"paired arrays differ in length: {r.size} vs {m.size}")
    ok = np.isfinite(r) & np.isfinite(m)
    return r[ok], m[ok]


def pearson_r(reference, measured) -> float:
    """Pearson correlation of the finite pairs (NaN when fewer than 3 or no variance)."""
    r, m = _pair(reference, measured)
    if r.size < 3 or np.ptp(r) == 0 or np.ptp(m) == 0:
        return float("nan")
    return float(_st().pearsonr(r, m)[0])


def mae(reference, measured) -> float:
    """Mean absolute error of the finite pairs."""
    r, m = _pair(reference, measured)
    return float(np.mean(np.abs(m - r))) if r.size else float("nan")


def bland_altman(reference, measured, *, z: float = 1.96) -> dict:
    """Bland–Altman bias (mean of ``measured − reference``) and limits of agreement ``bias ± z·SD``."""
    r, m = _pair(reference, measured)
    d = m - r
    if d.size < 2:
        return {"ba_bias": float("nan"), "ba_loa": [float("nan"), float("nan")], "ba_sd": float("nan")}
    bias, sd = float(d.mean()), float(d.std(ddof=1))
    return {"ba_bias": bias, "ba_loa": [bias - z * sd, bias + z * sd], "ba_sd": sd}


def agreement_summary(reference, measured) -> dict:
    """The contract's per-parameter regression block (without the n_patients/n_patches counts)."""
    i2, i3 = icc21(reference, measured), icc31(reference, measured)
    ba = bland_altman(reference, measured)
    return {"icc21": i2.value, "icc21_ci": list(i2.ci), "icc31": i3.value, "icc31_ci": list(i3.ci),
            "pearson_r": pearson_r(reference, measured), "mae": mae(reference, measured),
            "ba_bias": ba["ba_bias"], "ba_loa": ba["ba_loa"]}
