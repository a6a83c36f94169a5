"""Agreement calibration: a per-parameter linear map of a trained model's outputs, fitted on validation patients.

A network trained with a squared-error loss estimates the *conditional mean* of the reference. Where the input
explains only part of the reference (Pearson r < 1), that estimate is shrunk towards the population mean: its
spread is about r times the reference's, so high values read low and low values read high. For a measuring
instrument read against MR (ICC absolute agreement, Bland–Altman limits, reference ranges and z-scores) this is a
proportional bias. **Variance matching** removes it: ``y = a + b·ŷ`` with ``b = SD(reference) / SD(ŷ)`` and ``a``
making the means equal. Of all linear maps it maximises ICC(2,1) (which it brings to about r); it leaves Pearson r
unchanged, adds no information, and raises the mean squared error from (1 − r²) to 2 (1 − r) times the reference's
variance: it trades patch-by-patch accuracy for agreement of the distribution. ``method: none`` keeps the
squared-error estimate.

The map is fitted on the validation patients of the run, whose patches never update the weights, with the
predictions that inference makes (the mean over the evaluation's flipped copies). It is stored in the model file
(``calibration``) and applied by :meth:`ctsma.models.export.ParameterModel.predict`.
"""

from __future__ import annotations

import numpy as np

from .. import PARAMETERS

METHODS = ("none", "variance")


def identity(reason: str) -> dict:
    """The record of an uncalibrated model (slope 1, intercept 0)."""
    return {"method": "none", "slope": [1.0] * len(PARAMETERS), "intercept": [0.0] * len(PARAMETERS),
            "note": reason}


def fit(pred: np.ndarray, ref: np.ndarray, subjects, *, method: str = "variance", min_patients: int = 2,
        min_r: float = 0.2) -> dict:
    """Fit the map on validation predictions ``pred`` and references ``ref`` ((n, 4), physical units).

    A parameter whose validation predictions correlate with the reference below ``min_r`` (or have no spread) keeps
    slope 1 and intercept 0, and the record says so: stretching noise would only add noise.
    """
    if method == "none":
        return identity("calibration.method is none")
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")
    pred, ref = np.asarray(pred, float), np.asarray(ref, float)
    subjects = np.asarray(subjects).astype(str)
    n_pat = len(set(subjects))
    if n_pat < min_patients:
        return identity(f"{n_pat} validation patient(s); at least {min_patients} are needed to calibrate")
    slope, intercept, r_val, kept = [], [], [], []
    for j, p in enumerate(PARAMETERS):
        ok = np.isfinite(pred[:, j]) & np.isfinite(ref[:, j])
        x, y = pred[ok, j], ref[ok, j]
        sx, sy = (float(x.std()), float(y.std())) if ok.sum() >= 3 else (0.0, 0.0)
        r = float(np.corrcoef(x, y)[0, 1]) if sx > 0 and sy > 0 else float("nan")
        r_val.append(r)
        if not np.isfinite(r) or r < min_r:
            slope.append(1.0)
            intercept.append(0.0)
            continue
        b = sy / sx
        slope.append(b)
        intercept.append(float(y.mean() - b * x.mean()))
        kept.append(p)
    return {"method": method, "slope": slope, "intercept": intercept, "fitted_on": "validation patients",
            "n_patients": n_pat, "n_patches": int(len(pred)), "validation_r": r_val, "min_r": float(min_r),
            "calibrated": kept}


def apply(pred: np.ndarray, calibration: dict | None) -> np.ndarray:
    """``pred`` (n, 4) mapped by ``calibration`` (``None``: unchanged)."""
    if not calibration or calibration.get("method", "none") == "none":
        return pred
    return np.asarray(calibration["intercept"]) + np.asarray(calibration["slope"]) * pred


def invert(pred: np.ndarray, calibration: dict | None) -> np.ndarray:
    """The uncalibrated estimate behind calibrated predictions ``pred`` (the slopes are positive)."""
    if not calibration or calibration.get("method", "none") == "none":
        return pred
    return (pred - np.asarray(calibration["intercept"])) / np.asarray(calibration["slope"])


def is_calibrated(calibration: dict | None) -> bool:
    return bool(calibration) and calibration.get("method", "none") != "none"
