"""Ground-truth microstructure: re-evaluation in any box, and the per-ROI truth parameters."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import PARAMETERS, ROIS
from ..errors import InputImageError
from .anatomy import KneeModel
from .texture import truth_grid

LATTICE_MM = 0.16
"""Step of the lattice on which the smooth anatomy fields are evaluated before interpolation."""


def _load_metadata(src) -> dict:
    if isinstance(src, dict):
        return src
    p = Path(src)
    if p.is_dir():
        p = p / "metadata.json"
    if not p.is_file():
        raise InputImageError(f"phantom knee metadata not found: {p}")
    return json.loads(p.read_text(encoding="utf-8"))


@lru_cache(maxsize=8)
def _model_from_json(text: str) -> KneeModel:
    return KneeModel(json.loads(text)["subject"])


def knee_model(src) -> KneeModel:
    """The analytic model of a generated knee (folder, ``metadata.json`` path or its dict)."""
    meta = _load_metadata(src)
    return _model_from_json(json.dumps({"subject": meta["subject"] if "subject" in meta else meta}, sort_keys=True))


def _as3(v) -> np.ndarray:
    a = np.atleast_1d(np.asarray(v, dtype=np.float64))
    return np.repeat(a, 3) if a.size == 1 else a


def truth_binary(knee, origin_mm, size_vox, spacing_mm, *, trabecular_only: bool = False) -> np.ndarray:
    """Regenerate the true bone microstructure (bone = True) in any box of the MR frame.

    ``knee``: a knee folder, its ``metadata.json`` or the loaded dict. ``origin_mm``: LPS (x, y, z)
    of the *centre* of voxel (0, 0, 0) (ITK convention); ``size_vox``: (x, y, z) voxel counts;
    ``spacing_mm``: one number or (x, y, z). Axes are those of the MR image (identity direction).
    Returns a bool array shaped (z, y, x). Bone = cortex and subchondral plate plus the trabecular
    network; ``trabecular_only`` drops the shell. Deterministic: the same box always gives the same array.
    """
    model = knee_model(knee)
    org, sp = _as3(origin_mm), _as3(spacing_mm)
    size = np.asarray(size_vox, dtype=np.int64).reshape(3)
    if (size < 1).any() or (sp <= 0).any():
        raise ValueError("size_vox must be >= 1 and spacing_mm > 0")
    # smooth fields on a lattice anchored at multiples of LATTICE_MM (the same for every box),
    # trilinear interpolation to the fine grid
    last = org + (size - 1) * sp
    l0 = np.floor(org / LATTICE_MM).astype(np.int64)
    l1 = np.floor(last / LATTICE_MM).astype(np.int64) + 1
    lat = [np.arange(l0[i], l1[i] + 1) * LATTICE_MM for i in range(3)]
    nl = [len(v) for v in lat]
    zz, yy, xx = np.meshgrid(lat[2], lat[1], lat[0], indexing="ij")
    lp = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], -1)
    e = model.evaluate(lp, design_margin=0.5)
    shape_l = (nl[2], nl[1], nl[0])
    lattice = {k: e[k].reshape(shape_l) for k in ("dist", "shell", "tp", "tr", "tw", "near")}
    return truth_grid(model.fields, lattice, org, sp, size, LATTICE_MM, l0, trabecular_only)


def _candidates(model: KneeModel, roi: int, rng, n: int = 4000) -> np.ndarray:
    a = model.p["anatomy"]
    m = 1.0 if model.p["side"] == "R" else -1.0
    f, t, r = a["femur"], a["tibia"], a["roi"]
    if roi in (1, 2):
        key = "med" if roi == 1 else "lat"
        c, ax = np.asarray(f[f"{key}_c"]), np.asarray(f[f"{key}_a"])
        lo = [c[0] - 0.7 * ax[0], c[1] - 0.5 * ax[1], c[2] - ax[2]]
        hi = [c[0] + 0.7 * ax[0], c[1] + 0.5 * ax[1], c[2] - 0.45 * ax[2]]
    else:
        cx = r["tib_cx"] if roi == 3 else -r["tib_cx"]
        zt = t["zt_med"] if roi == 3 else t["zt_lat"]
        lo = [cx - r["tib_rx"], t["y0"] - r["tib_ry"], zt - 8.0]
        hi = [cx + r["tib_rx"], t["y0"] + r["tib_ry"], zt]
    pc = rng.uniform(lo, hi, (n, 3))
    pc[:, 0] *= m
    return pc


def roi_points(model: KneeModel, roi: int, rng, k: int, depth_range=(1.0, 6.0), n: int = 4000) -> np.ndarray:
    """``k`` random MR-frame points inside ROI ``roi`` whose depth under the bone surface is in range."""
    pc = _candidates(model, roi, rng, n)
    e = model.evaluate(pc, design_margin=-1e9)
    depth = -e["dist"]
    ok = np.flatnonzero((e["roi"] == roi) & (depth >= depth_range[0]) & (depth <= depth_range[1]))
    return pc[ok[:k]]


def measure_truth(model: KneeModel, settings, rng) -> tuple[dict, dict]:
    """True per-ROI parameters: the mean over ``truth_patches_per_roi`` cubes of the truth grid.

    Each cube (edge ``truth_patch_mm``, voxel ``truth_spacing``) is centred at a random ROI point
    3-4.5 mm under the articular bone surface, so it lies in trabecular bone (below the plate),
    and is measured with :func:`ctsma.morphometry.measure_batch` on the trabecular network alone.
    """
    h = settings.truth_spacing
    nv = int(round(settings.truth_patch_mm / h))
    half = (nv - 1) / 2.0 * h
    try:
        from ..morphometry import measure_batch
    except ImportError:  # pragma: no cover - the morphometry engine is part of the package
        measure_batch = None
    per_roi, patches = {}, {}
    for name, val in ROIS.items():
        centres = roi_points(model, val, rng, settings.truth_patches_per_roi, depth_range=(3.0, 4.5))
        if len(centres) == 0:
            raise RuntimeError(f"no truth patch centre found in ROI {name}")
        arrs = np.stack([truth_binary({"subject": model.p}, c - half, (nv, nv, nv), h, trabecular_only=True)
                         for c in centres])
        if measure_batch is not None:
            res = {k: np.asarray(v, dtype=np.float64) for k, v in measure_batch(arrs, (h, h, h), workers=1).items()}
        else:
            res = {"BV/TV": arrs.reshape(len(arrs), -1).mean(1)}
        per_roi[name] = {p: float(np.nanmean(res[p])) if p in res else float("nan") for p in PARAMETERS}
        patches[name] = {"centres_mm": np.round(centres, 6).tolist(), "edge_vox": nv, "spacing_mm": h,
                         **{p: res[p].tolist() for p in PARAMETERS if p in res}}
    return per_roi, {"patches": patches, "engine": "ctsma.morphometry.measure_batch" if measure_batch else
                     "unavailable (BV/TV only)", "pid": os.getpid()}
