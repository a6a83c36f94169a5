"""Blending of patch predictions into maps, and per-ROI tables.

Patch predictions are blended into voxel maps with a Gaussian window over each patch's extent
(the same idea as sliding-window inference with Gaussian importance in MONAI). Each ROI voxel
only receives predictions of patches centred in the same ROI, and voxels outside the ROIs are NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import PARAMETERS, ROIS


def display_ranges(meta: dict, k: float = 3.0) -> dict:
    """``{parameter: [lo, hi]}``: the range of a map's colour scale for a model, its training references' mean
    ± ``k`` SD (``target_normalisation`` of the model file), not below 0 (BV/TV not above 1). One scale per model,
    so that two patients' maps compare; in the model's own units, so that a model trained on MR references (whose
    apparent Tb.Th reads about 3x the true one) does not fill the whole map with the scale's top colour."""
    norm = meta.get("target_normalisation") or {}
    out = {}
    for p, mean, sd in zip(meta.get("parameters", PARAMETERS), norm.get("mean", ()), norm.get("sd", ())):
        lo, hi = max(0.0, float(mean) - k * float(sd)), float(mean) + k * float(sd)
        out[p] = [lo, min(1.0, hi) if p == "BV/TV" else hi]
    return out


def _gaussian_window(half: np.ndarray, spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.exp(-(zz ** 2 + yy ** 2 + xx ** 2) / (2 * sigma_mm ** 2)).astype(np.float32)


def blend_maps(shape, spacing_zyx, rois: np.ndarray, centres: np.ndarray, centre_labels: np.ndarray,
               values: np.ndarray, extent_mm: float, sigma_mm: float | None = None, z_range=None) -> np.ndarray:
    """Blend per-patch values (N,P) into P voxel maps (P,z,y,x); NaN outside the ROIs.

    Each patch spreads its value over its physical extent with a Gaussian weight (sigma defaults to a
    quarter of the extent); a voxel's value is the weighted mean of the patches of its own ROI that
    cover it, and ROI voxels covered by none take their nearest patch's value.

    ``z_range=(z0, z1)`` computes only the planes ``z0:z1`` of the maps (``rois`` and ``centres`` still
    describe the whole ``shape``): the result equals those planes of the whole maps bit for bit, since each
    voxel sums the same patches in the same order; this is how ``ctsma infer`` works in z-slabs.
    """
    spacing = np.asarray(spacing_zyx, float)
    values = np.asarray(values, np.float32)
    n_par = values.shape[1]
    z0, z1 = (0, int(shape[0])) if z_range is None else (int(z_range[0]), int(z_range[1]))
    sub = (z1 - z0,) + tuple(shape[1:])
    half = np.maximum(0, np.floor(extent_mm / 2 / spacing).astype(int))
    win = _gaussian_window(half, spacing, sigma_mm or extent_mm / 4)
    num = np.zeros((n_par,) + sub, np.float32)
    den = np.zeros(sub, np.float32)
    rois_sub = rois[z0:z1]
    off = np.array([z0, 0, 0])
    lim = np.array([z1, shape[1], shape[2]])
    for c, lab, v in zip(centres, centre_labels, values):
        lo = c - half
        hi = c + half + 1
        clo = np.maximum(lo, off)
        chi = np.minimum(hi, lim)
        if np.any(chi <= clo):
            continue  # the patch does not reach these planes
        sl = tuple(slice(a - o, b - o) for a, b, o in zip(clo, chi, off))
        wsl = tuple(slice(a - l, b - l) for a, b, l in zip(clo, chi, lo))
        w = win[wsl] * (rois_sub[sl] == lab)
        den[sl] += w
        num[(slice(None),) + sl] += w[None] * v[:, None, None, None]
    out = np.full((n_par,) + sub, np.nan, np.float32)
    inside = rois_sub > 0
    covered = inside & (den > 0)
    out[:, covered] = num[:, covered] / den[covered]
    missing = inside & ~covered
    if missing.any() and len(centres):
        for lab in np.unique(rois_sub[missing]):
            sel = np.flatnonzero(centre_labels == lab)
            vox = np.argwhere(missing & (rois_sub == lab))
            if len(sel) == 0:
                continue
            d = ((((vox + off)[:, None, :] - centres[None, sel, :]) * spacing) ** 2).sum(-1)
            nearest = sel[np.argmin(d, axis=1)]
            out[:, vox[:, 0], vox[:, 1], vox[:, 2]] = values[nearest].T
    return out


def roi_table(values: np.ndarray, centre_labels: np.ndarray, parameters=PARAMETERS) -> pd.DataFrame:
    """Per ROI and parameter: mean, SD, median, IQR and number of patches (contract columns)."""
    names = {v: k for k, v in ROIS.items()}
    rows = []
    for label in sorted(names):
        sel = centre_labels == label
        n = int(sel.sum())
        for j, p in enumerate(parameters):
            x = values[sel, j]
            if n:
                q1, med, q3 = np.percentile(x, [25, 50, 75])
                rows.append({"roi": names[label], "parameter": p, "mean": float(x.mean()),
                             "sd": float(x.std(ddof=1)) if n > 1 else float("nan"), "median": float(med),
                             "iqr": float(q3 - q1), "n_patches": n})
            else:
                rows.append({"roi": names[label], "parameter": p, "mean": np.nan, "sd": np.nan,
                             "median": np.nan, "iqr": np.nan, "n_patches": 0})
    return pd.DataFrame(rows, columns=["roi", "parameter", "mean", "sd", "median", "iqr", "n_patches"])
