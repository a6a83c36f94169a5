"""Many small patches at once: :func:`measure_batch` (BV/TV, Tb.Th, Tb.Sp, Tb.N of each).

This is how the MR reference parameters of thousands of dataset patches are computed, so it is built for
throughput. With the default ``fast`` method a patch (:func:`_patch`) is a few compiled calls, each of which
releases the GIL, and the patches are shared out over threads (two workers on two cores: about twice one).
Per patch:

* one distance transform for both phases (:func:`.distance.edtsq_labels`: bit for bit what the ``edt`` package
  gives, without holding the GIL as ``edt`` does);
* one reduced medial axis for both phases (:func:`.power.reduced_axis` on the two-phase distance map).
  A phase voxel's power distance to its own phase's balls is negative (at most minus its own squared distance),
  and to any ball of the other phase it is >= 0 (the voxel lies outside that ball). So every voxel is labelled
  by a ball of its own phase, and the axis splits into the two phases' reduced axes. Only exact ties between
  equally near balls could be broken otherwise than in two separate transforms; the suite checks the means
  against :func:`~ctsma.morphometry.local_thickness` to 1e-12;
* then, per phase, the sphere values, their order and the painting, as in :func:`.thickness._thickness_from_dsq`,
  and the mean over the phase's voxels. Both phases read one signed distance map (the marrow's distances
  negative) and the label image, and the painter sums the values it paints instead of writing a map
  (:func:`.paint.paint_sum`: the map's sum bit for bit on any patch whose voxel count times the ratio of its largest
  to its smallest non-zero value is below 2**29, far beyond a patch's ratios).

Values are those of :func:`~ctsma.morphometry.measure` on each patch alone (spheres confined to the patch and its
ROI). ``method="exact"`` takes the general path (:func:`.parameters.phase_pair_thickness`) patch by patch.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .distance import edtsq_labels
from .paint import descending_order, paint_sum
from .parameters import MorphometryWarning, phase_pair_thickness
from .power import reduced_axis
from .thickness import _values_signed, unit_spacing
from .validate import MorphometryError, check_binary, check_convention, check_spacing

BATCH_KEYS = ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")


@numba.njit(cache=True, nogil=True)
def _labels(bone, roi):
    """uint8 labels (2: bone in the ROI, 1: marrow in the ROI, 0: outside) and the bone and marrow counts."""
    lab = np.empty(bone.shape, np.uint8)
    bf, lf = bone.ravel(), lab.ravel()
    rf = roi.ravel()
    n_b = 0
    n_in = 0
    for i in range(bf.shape[0]):  # branch-free (vectorised)
        inside = np.uint8(rf[i])
        b = np.uint8(bf[i]) & inside
        lf[i] = inside + b
        n_b += b
        n_in += inside
    return lab, n_b, n_in - n_b


@numba.njit(cache=True, nogil=True)
def _signed_distances(lab, d):
    """The distance map (mm, float32) with the marrow's distances negative: both phases' own maps in one array
    (:func:`.thickness._own` reads either)."""
    s = np.empty(lab.shape, np.float32)
    lf, df, sf = lab.ravel(), d.ravel(), s.ravel()
    for i in range(lf.shape[0]):  # branch-free (vectorised)
        sf[i] = np.sqrt(df[i]) * np.float32(2 * (lf[i] >> 1) - 1)  # label 2: +1; 1 (and 0, distance 0): -1
    return s


@numba.njit(cache=True, nogil=True)
def _phase_mean(lab, d, s, axis_idx, label, n, sz, sy, sx, default_conv, unit):
    """Mean local thickness (mm) over the ``n`` voxels of phase ``label``, from the two-phase maps (``s``: the signed
    distances) on the grid of :func:`~.thickness.unit_spacing`: each sphere's value is scaled by ``unit`` (float32)
    before it is painted, as the one-image path scales its float32 map."""
    lf = lab.ravel()
    idx = np.empty(axis_idx.shape[0], np.int64)
    m = 0
    for i in range(axis_idx.shape[0]):  # branch-free compaction (numba's boolean indexing is slower)
        idx[m] = axis_idx[i]
        m += lf[axis_idx[i]] == label
    idx = idx[:m]
    val = _values_signed(s, idx, sz, sy, sx, default_conv, np.float32(1.0 if label == 2 else -1.0))
    order = descending_order(val)
    idx_o = np.empty(m, np.int64)
    val_o = np.empty(m, np.float32)
    for j in range(m):  # explicit gathers (numba's integer-array indexing is slower)
        idx_o[j] = idx[order[j]]
        val_o[j] = val[order[j]] * unit
    return paint_sum(lab, label, d.ravel(), idx_o, val_o, sz, sy, sx) / n


def _patch(bone, roi, sz, sy, sx, default_conv, unit=1.0):
    """(BV/TV, Tb.Th, Tb.Sp) of one patch with the ``fast`` method, NaN where undefined.

    A few compiled calls, each of which releases the GIL (the Python between them takes microseconds)."""
    lab, n_b, n_m = _labels(bone, roi)
    nan = float("nan")
    n_roi = n_b + n_m
    if n_roi == 0:
        return nan, nan, nan
    bvtv = n_b / n_roi
    size = lab.size
    if n_b == size or n_m == size:  # one phase fills the patch: no boundary, both spacings undefined
        return bvtv, nan, nan
    d = edtsq_labels(lab, sz, sy, sx)
    axis_idx = reduced_axis(lab.shape, d.ravel(), lab.ravel() > 0, sz, sy, sx)
    s = _signed_distances(lab, d)
    u = np.float32(unit)
    th = _phase_mean(lab, d, s, axis_idx, 2, n_b, sz, sy, sx, default_conv, u) if n_b else nan
    sp = _phase_mean(lab, d, s, axis_idx, 1, n_m, sz, sy, sx, default_conv, u) if n_m else nan
    return bvtv, th, sp


def _patch_exact(bone, roi, sp, convention):
    """(BV/TV, Tb.Th, Tb.Sp) of one patch with the ``exact`` method (general path)."""
    roi_b, marrow = (bone, ~bone) if roi is None else (bone & roi, roi & ~bone)
    n_b, n_m = int(np.count_nonzero(roi_b)), int(np.count_nonzero(marrow))
    if n_b + n_m == 0:
        return np.nan, np.nan, np.nan
    th_map, sp_map = phase_pair_thickness(roi_b, marrow, sp, convention, 1, "exact")
    th = float(th_map[roi_b].mean(dtype=np.float64)) if n_b else np.nan
    sep = float(sp_map[marrow].mean(dtype=np.float64)) if n_m else np.nan
    return n_b / (n_b + n_m), th, sep


def measure_batch(binary_patches, spacing_zyx, masks=None, convention: str = "default",
                  workers: int | None = None, method: str = "fast") -> dict[str, np.ndarray]:
    """BV/TV, Tb.Th, Tb.Sp and Tb.N (1/(Tb.Th+Tb.Sp)) of each of N binary patches (N, z, y, x).

    Spheres are confined to each patch (and to its mask, if ``masks`` (N, z, y, x) is given). Returns a
    dict of float64 arrays of length N; a patch whose ROI is empty, all bone or all marrow gets NaN where a
    value is undefined, with one warning for the batch. ``workers`` threads (default: the CPU count, at
    most 8) share the patches; with the ``fast`` method each patch runs without the GIL.
    """
    p = np.asarray(binary_patches)
    if p.ndim != 4:
        raise MorphometryError(f"binary_patches must be 4D (N, z, y, x), got shape {p.shape}")
    sp = check_spacing(spacing_zyx)
    check_convention(convention)
    if method not in ("fast", "exact"):
        raise MorphometryError(f"unknown local-thickness method {method!r}; use 'fast' or 'exact'")
    n = p.shape[0]
    if p.dtype != bool:
        p = check_binary(p.reshape(n * p.shape[1], *p.shape[2:]), "binary patches").reshape(p.shape)
    p = np.ascontiguousarray(p)
    m = None
    if masks is not None:
        m = np.asarray(masks)
        if m.shape != p.shape:
            raise MorphometryError(f"masks have shape {m.shape} but the patches have {p.shape}")
        m = np.ascontiguousarray(m != 0)
    out = {k: np.full(n, np.nan) for k in BATCH_KEYS}
    if n == 0:
        return out
    workers = workers or min(os.cpu_count() or 1, 8)
    (sz, sy, sx), unit = unit_spacing(sp)  # the local thickness's grid; its lengths times unit are mm
    whole = np.ones(p.shape[1:], bool)

    def job(i):
        if method == "exact":
            return _patch_exact(p[i], None if m is None else m[i], sp, convention)
        return _patch(p[i], whole if m is None else m[i], sz, sy, sx, convention == "default", unit)

    if workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(job, range(n)))
    else:
        results = [job(i) for i in range(n)]
    for i, (bvtv, th, sep) in enumerate(results):
        out["BV/TV"][i], out["Tb.Th"][i], out["Tb.Sp"][i] = bvtv, th, sep
    out["Tb.N"] = 1.0 / (out["Tb.Th"] + out["Tb.Sp"])  # NaN where either is undefined
    bad = int(np.count_nonzero(~np.isfinite(out["Tb.N"])))
    if bad:
        warnings.warn(f"{bad} of {n} patches have an empty, all-bone or all-marrow ROI; their undefined "
                      "parameters are NaN", MorphometryWarning, stacklevel=2)
    return out
