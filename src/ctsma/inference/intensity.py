"""The CT's bone intensity against the model's training knees.

A student reads HU. Its estimates shift with the CT's bone intensity whatever its cause: the knee's own bone tissue
and marrow, or a scanner calibrated or set differently (tube voltage, reconstruction). On the phantom, the knee's
own tissue HU explain about 0.03 of the students' patch-level ICC (docs/training.md, *The knee's own tissue HU*),
and an offset of the whole CT's HU moves the shipped student's ROI means (docs/inference.md, *Bone intensity*).
A model file therefore records the spread of its training knees' intensity, and ``infer`` warns when a CT lies
far outside it.

The statistic is robust and needs nothing but the patches the model reads: each patch's mean HU over its cube,
and a knee's median over its patches (the subchondral ROIs of one knee).
"""

from __future__ import annotations

import numpy as np

MARGIN = 0.5  # of the training knees' range, on either side of it, beyond which a CT gets a warning
ESTIMATOR = "median over the knee's patches of each patch's mean HU (the whole cube, as the model reads it)"


def patch_means(patches: np.ndarray) -> np.ndarray:
    """Each patch's mean HU over its cube, for patches (n, ...)."""
    p = np.asarray(patches)
    return p.reshape(len(p), -1).mean(axis=1, dtype=np.float64)


def knee_intensity(patches: np.ndarray) -> float:
    """The knee's median patch mean (HU) of its CT patches ``patches`` (n, ...)."""
    return float(np.median(patch_means(patches)))


def training_intensity(means: np.ndarray, subjects, train_subjects) -> dict | None:
    """The record a student's model file keeps (``input.ct_intensity``): the mean, SD and range over its training
    knees of :func:`knee_intensity`. ``means`` (n,) are :func:`patch_means` of the store's CT patches and
    ``subjects`` (n,) their knees; None when fewer than 3 training knees have patches (no spread to compare
    with)."""
    means = np.asarray(means, np.float64)
    subjects = np.asarray(subjects).astype(str)
    values = []
    for s in sorted({str(x) for x in train_subjects}):
        sel = subjects == s
        if sel.any():
            values.append(float(np.median(means[sel])))
    if len(values) < 3:
        return None
    v = np.asarray(values)
    return {"knee_mean_hu": float(v.mean()), "knee_sd_hu": float(v.std(ddof=1)),
            "knee_range_hu": [float(v.min()), float(v.max())], "n_knees": len(v), "estimator": ESTIMATOR}


def store_patch_means(store, indices, chunk: int = 4096) -> np.ndarray:
    """:func:`patch_means` of a patch store's CT patches ``indices``, read in chunks (a large store's CT patches
    need not fit in memory at once)."""
    idx = np.asarray(indices, dtype=np.int64)
    return np.concatenate([patch_means(store.read("ct", idx[i:i + chunk])) for i in range(0, len(idx), chunk)]
                          or [np.zeros(0)])


def intensity_check(patches: np.ndarray, reference: dict | None) -> tuple[dict, list[str]]:
    """The CT's knee intensity against a model's ``input.ct_intensity`` record: (summary block, warnings).

    A warning when the knee lies outside the training knees' range widened by :data:`MARGIN` of its width on
    either side. The training knees differ in their bone (OA knees are denser), so a CT inside that band is not
    told apart from a differently calibrated one; outside it, the model reads bone unlike any it was trained on.
    (On the phantom, a band of 3 training SDs flagged 1 of 72 held-out knees of two cohorts, this band none.)"""
    value = knee_intensity(patches)
    info: dict = {"knee_hu": value, "estimator": ESTIMATOR}
    if not reference or not reference.get("knee_range_hu"):
        info["model_reference"] = None
        return info, []
    lo, hi = (float(v) for v in reference["knee_range_hu"])
    band = [lo - MARGIN * (hi - lo), hi + MARGIN * (hi - lo)]
    info.update({"model_knee_range_hu": [lo, hi], "model_band_hu": band,
                 "model_knee_mean_hu": reference.get("knee_mean_hu"), "model_knee_sd_hu": reference.get("knee_sd_hu")})
    if band[0] <= value <= band[1]:
        return info, []
    word = "brighter" if value > hi else "darker"
    return info, [f"the CT's subchondral bone is {word} than the model's training knees ({value:.0f} HU as the "
                  f"median patch mean, against {lo:.0f} to {hi:.0f} HU over its {reference.get('n_knees', '?')} "
                  "training knees): the estimates are extrapolated. A scanner calibrated or set differently (tube "
                  "voltage, reconstruction) or bone unlike the training cohort's gives this; the maps shift with the "
                  "bone's HU (docs/inference.md, 'Bone intensity')"]


__all__ = ["MARGIN", "patch_means", "knee_intensity", "training_intensity", "store_patch_means", "intensity_check"]
