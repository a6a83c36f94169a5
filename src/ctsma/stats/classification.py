"""Diagnostic accuracy: AUC with DeLong CI, DeLong test for two correlated AUCs, threshold metrics.

DeLong, DeLong & Clarke-Pearson (1988) give the variance of the empirical AUC from its structural
components; the fast mid-rank algorithm of Sun & Xu (2014) computes them in O(N log N). It is
hand-written here because neither scikit-learn nor SciPy exposes the AUC variance or the
correlated-AUC test; the tests check it against a brute-force pairwise computation and a bootstrap.
The CI is ``AUC ± z·SE`` clipped to [0, 1] (as pROC does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._scipy import scipy_stats as _st


@dataclass(frozen=True)
class AUCResult:
    auc: float
    ci: tuple[float, float]
    se: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class DeLongTest:
    auc_a: float
    auc_b: float
    diff: float
    diff_ci: tuple[float, float]
    z: float
    p: float


def _split(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.ravel(np.asarray(y_true))
    s = np.asarray(scores, dtype=float)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    if s.shape[1] != y.size:
        raise ValueError(f"{y.size} labels but {s.shape[1]} scores")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be 0/1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    pos, neg = s[:, y == 1], s[:, y == 0]
    if pos.shape[1] < 1 or neg.shape[1] < 1:
        raise ValueError("AUC needs at least one positive and one negative case")
    return pos, neg


def _structural_components(pos: np.ndarray, neg: np.ndarray):
    """AUCs (k,), V10 (k, m) and V01 (k, n) for k score rows by mid-ranks (Sun & Xu 2014)."""
    m, n = pos.shape[1], neg.shape[1]
    both = np.concatenate([pos, neg], axis=1)
    r_all = _st().rankdata(both, axis=1)
    r_pos = _st().rankdata(pos, axis=1)
    r_neg = _st().rankdata(neg, axis=1)
    v10 = (r_all[:, :m] - r_pos) / n            # P(score_neg < x_i) + 0.5 P(=)
    v01 = 1.0 - (r_all[:, m:] - r_neg) / m      # P(score_pos > y_j) + 0.5 P(=)
    return v10.mean(axis=1), v10, v01


def _covariance(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((v10.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((v01.shape[0],) * 2)
    return s10 / m + s01 / n


def auc_delong(y_true, scores, *, alpha: float = 0.05) -> AUCResult:
    """Empirical AUC (ties count one half) with its DeLong standard error and CI."""
    pos, neg = _split(y_true, scores)
    aucs, v10, v01 = _structural_components(pos, neg)
    se = float(np.sqrt(max(_covariance(v10, v01)[0, 0], 0.0)))
    z = _st().norm.ppf(1 - alpha / 2)
    a = float(aucs[0])
    return AUCResult(a, (max(0.0, a - z * se), min(1.0, a + z * se)), se, pos.shape[1], neg.shape[1])


def delong_test(y_true, scores_a, scores_b, *, alpha: float = 0.05) -> DeLongTest:
    """Two-sided DeLong test of AUC(a) = AUC(b) for two scores on the SAME cases (correlated AUCs)."""
    pos, neg = _split(y_true, np.vstack([np.ravel(scores_a), np.ravel(scores_b)]))
    aucs, v10, v01 = _structural_components(pos, neg)
    cov = _covariance(v10, v01)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(var, 0.0)))
    zq = _st().norm.ppf(1 - alpha / 2)
    if se == 0.0:  # no spread to test against: equal AUCs are p = 1; different ones leave the test undefined
        z, p = (0.0, 1.0) if diff == 0 else (float("nan"), float("nan"))
    else:
        z = diff / se
        p = float(2 * _st().norm.sf(abs(z)))
    return DeLongTest(float(aucs[0]), float(aucs[1]), diff, (diff - zq * se, diff + zq * se), float(z), p)


def brier_score(y_true, prob) -> float:
    """Mean squared difference between predicted probability and the 0/1 outcome."""
    y = np.ravel(np.asarray(y_true, dtype=float))
    p = np.ravel(np.asarray(prob, dtype=float))
    return float(np.mean((p - y) ** 2))


def binary_metrics(y_true, prob, *, threshold: float = 0.5) -> dict:
    """Accuracy, sensitivity (= recall), specificity, precision, F1 at ``threshold``, and the Brier score.

    A ratio with a zero denominator (e.g. precision with no positive predictions) is NaN.
    """
    y = np.ravel(np.asarray(y_true)).astype(int)
    p = np.ravel(np.asarray(prob, dtype=float))
    pred = (p >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))

    def ratio(a, b):
        return a / b if b else float("nan")

    sens, prec = ratio(tp, tp + fn), ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {"accuracy": ratio(tp + tn, y.size), "sensitivity": sens, "specificity": ratio(tn, tn + fp),
            "precision": prec, "recall": sens, "f1": f1, "brier": brier_score(y, p),
            "tp": tp, "tn": tn, "fp": fp, "fn": fn, "threshold": threshold}


def r2_score(y_true, y_pred) -> float:
    """Coefficient of determination 1 − SS_res/SS_tot (NaN when the truth is constant)."""
    y = np.ravel(np.asarray(y_true, dtype=float))
    f = np.ravel(np.asarray(y_pred, dtype=float))
    ss_tot = np.sum((y - y.mean()) ** 2)
    return float(1 - np.sum((y - f) ** 2) / ss_tot) if ss_tot > 0 else float("nan")


def regression_metrics(y_true, y_pred) -> dict:
    """MAE and R² of a regressed score."""
    y = np.ravel(np.asarray(y_true, dtype=float))
    f = np.ravel(np.asarray(y_pred, dtype=float))
    return {"mae": float(np.mean(np.abs(f - y))), "r2": r2_score(y, f)}
