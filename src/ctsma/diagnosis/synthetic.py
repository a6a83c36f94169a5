"""Synthetic patch tables with a known OA signal, for tests, benchmarks and a quick self-check.

The signal mimics subchondral sclerosis: OA raises BV/TV and Tb.Th and lowers Tb.Sp, most in the
medial tibial plateau (MTP), then the medial femoral condyle (MFC), and more in patches close to the
joint (small ``rel_z``). Severity grows with the effect. :func:`measured` adds measurement error
as a student network would (patch noise plus a per-knee error), so sources of different quality
can be compared against a known truth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import PARAMETERS
from .data import ROI_ORDER

_EFFECT_BY_ROI = {"MFC": 0.5, "LFC": 0.1, "MTP": 1.0, "LTP": 0.2}


def synthetic_cohort(n_subjects: int = 60, patches_per_roi: int = 12, *, effect: float = 1.0,
                     oa_fraction: float = 0.5, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(true patch table, labels)``; labels have subject, oa, kl_grade, severity."""
    rng = np.random.default_rng(seed)
    n_oa = int(round(n_subjects * oa_fraction))
    oa = rng.permutation(np.r_[np.ones(n_oa, int), np.zeros(n_subjects - n_oa, int)])
    kl = np.where(oa == 1, rng.integers(2, 5, n_subjects), rng.integers(0, 2, n_subjects))
    # severity (MOAKS-like, 0..~12): grows with KL grade, with some spread
    severity = np.clip(2.5 * kl + rng.normal(0, 1.0, n_subjects), 0, None)
    rows = []
    for i in range(n_subjects):
        subj = f"S{i:03d}"
        knee_bvtv = rng.normal(0.25, 0.03)      # healthy variation between people
        knee_th = rng.normal(0.20, 0.02)
        drive = effect * severity[i] / 10.0     # 0 .. ~1.2
        for roi in ROI_ORDER:
            w = _EFFECT_BY_ROI[roi] * drive
            pos = np.column_stack([rng.uniform(-15, 15, patches_per_roi), rng.uniform(-10, 10, patches_per_roi),
                                   rng.uniform(0, 12, patches_per_roi)])
            near = np.exp(-pos[:, 2] / 6.0)      # stronger next to the joint surface
            bvtv = knee_bvtv * (1 + 0.30 * w * near) + rng.normal(0, 0.02, patches_per_roi)
            th = knee_th * (1 + 0.20 * w * near) + rng.normal(0, 0.015, patches_per_roi)
            bvtv, th = np.clip(bvtv, 0.05, 0.8), np.clip(th, 0.05, None)
            tbn = bvtv / th
            sp = np.clip(1.0 / tbn - th, 0.05, None)
            for k in range(patches_per_roi):
                rows.append((subj, roi, *pos[k], bvtv[k], th[k], sp[k], tbn[k]))
    table = pd.DataFrame(rows, columns=["subject", "roi", "rel_x", "rel_y", "rel_z", *PARAMETERS])
    labels = pd.DataFrame({"subject": [f"S{i:03d}" for i in range(n_subjects)], "oa": oa, "kl_grade": kl,
                           "severity": severity})
    return table, labels


def measured(true_table: pd.DataFrame, noise: float, *, knee_noise: float | None = None,
             seed: int = 0) -> pd.DataFrame:
    """The true table seen through a noisy estimator.

    ``noise`` is the patch-level error SD as a fraction of each parameter's population SD; the per-knee
    error (shared by all patches of a knee and ROI) defaults to half of it.
    """
    rng = np.random.default_rng(seed)
    out = true_table.copy()
    knee_noise = noise / 2 if knee_noise is None else knee_noise
    keys = out["subject"] + "/" + out["roi"]
    codes, uniq = pd.factorize(keys)
    for p in PARAMETERS:
        sd = float(out[p].std())
        shared = rng.normal(0, knee_noise * sd, len(uniq))[codes]
        out[p] = out[p] + rng.normal(0, noise * sd, len(out)) + shared
    return out
