"""Public entry points: :func:`measure` (one image, every parameter) and :func:`measure_batch` (many patches)."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .binarise import binarise, _as_array
from .parameters import DEFAULT_BINS, MorphometryWarning, measure_binary, phase_pair_thickness
from .validate import MorphometryError, check_binary, check_convention, check_spacing


def measure(image, spacing_zyx=None, mask=None, *, modality: str = "binary", threshold=None,
            method: str = "global", n4: bool = False, convention: str = "default", spheres: str = "roi",
            histogram_bins=DEFAULT_BINS, smooth_sigma_vox: float = 0.0, window_mm: float | None = None,
            threads: int = 1, thickness_method: str = "fast", return_maps: bool = False, slabs="auto",
            progress=None, **binarise_kw):
    """Trabecular parameters of ``image`` inside ``mask``.

    ``image`` is a (z, y, x) array (then ``spacing_zyx`` in mm is required) or a SimpleITK image (spacing
    from it). ``modality`` is ``binary`` (already segmented, bone = 1), ``ct``/``microct`` (bone bright) or
    ``mr`` (bone dark); grey images are binarised by :func:`binarise` (``threshold`` None/"otsu"/number,
    ``method`` global/local, ``n4``). ``mask`` (array or SimpleITK image on the same grid, any shape) is
    the ROI; None means the whole image.

    Returns a dict with ``BV/TV, Tb.Th, Tb.Sp, Tb.N, BS/BV, Conn.D, Tb.Th.sd, Tb.Sp.sd, Tb.N.formula,
    Tb.N.plate, convention, binarisation, spacing, roi_voxels, histograms`` (lengths in mm, Tb.N in 1/mm,
    Conn.D in 1/mm³). Undefined values (e.g. Tb.Sp of an all-bone ROI) are NaN with a warning.
    With ``return_maps=True`` it returns ``(result, {"thickness", "separation", "bone"})``.

    Over the memory budget (``CTSMA_MEMORY_GB``) the local thickness is computed in z-slabs with the same
    results; ``slabs`` and ``progress`` are passed to :func:`~.parameters.measure_binary`.
    """
    arr, sp = _as_array(image, spacing_zyx)
    sp = check_spacing(sp)
    if mask is not None:
        mask, _ = _as_array(mask, sp)
    check_convention(convention)
    bone, info = binarise(arr, sp, mask, modality=modality, threshold=threshold, method=method, n4=n4,
                          smooth_sigma_vox=smooth_sigma_vox, window_mm=window_mm, **binarise_kw)
    out = measure_binary(bone, sp, mask, convention=convention, spheres=spheres, histogram_bins=histogram_bins,
                         threads=threads, method=thickness_method, return_maps=return_maps, slabs=slabs,
                         progress=progress)
    res, maps = out if return_maps else (out, None)
    res["binarisation"] = info
    if return_maps:
        maps["bone"] = bone
        return res, maps
    return res


BATCH_KEYS = ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")


def _one_patch(bone: np.ndarray, roi: np.ndarray | None, sp, convention: str, method: str):
    if roi is None:
        roi_b, marrow = bone, ~bone
        n_roi = bone.size
    else:
        roi_b, marrow = bone & roi, roi & ~bone
        n_roi = int(np.count_nonzero(roi))
    if n_roi == 0:
        return (np.nan,) * 4
    n_b = int(np.count_nonzero(roi_b))
    n_m = n_roi - n_b
    bvtv = n_b / n_roi
    th_map, sp_map = phase_pair_thickness(roi_b, marrow, sp, convention, 1, method)  # one distance transform
    th = float(th_map[roi_b].mean(dtype=np.float64)) if n_b else np.nan
    sep = float(sp_map[marrow].mean(dtype=np.float64)) if n_m else np.nan
    tbn = 1.0 / (th + sep) if np.isfinite(th) and np.isfinite(sep) else np.nan
    return bvtv, th, sep, tbn


def measure_batch(binary_patches, spacing_zyx, masks=None, convention: str = "default",
                  workers: int | None = None, method: str = "fast") -> dict[str, np.ndarray]:
    """BV/TV, Tb.Th, Tb.Sp and Tb.N (1/(Tb.Th+Tb.Sp)) of each of N binary patches (N, z, y, x).

    Spheres are confined to each patch (and to its mask, if ``masks`` (N, z, y, x) is given). Returns a
    dict of float64 arrays of length N; a patch whose ROI is empty, all bone or all marrow gets NaN where a
    value is undefined, with one warning for the batch. ``workers`` threads (default: the CPU count, at
    most 8) share the patches; the numba kernels release the GIL.
    """
    p = np.asarray(binary_patches)
    if p.ndim != 4:
        raise MorphometryError(f"binary_patches must be 4D (N, z, y, x), got shape {p.shape}")
    sp = check_spacing(spacing_zyx)
    check_convention(convention)
    n = p.shape[0]
    if p.dtype != bool:
        p = check_binary(p.reshape(n * p.shape[1], *p.shape[2:]), "binary patches").reshape(p.shape)
    m = None
    if masks is not None:
        m = np.asarray(masks)
        if m.shape != p.shape:
            raise MorphometryError(f"masks have shape {m.shape} but the patches have {p.shape}")
        m = m != 0
    out = {k: np.full(n, np.nan) for k in BATCH_KEYS}
    if n == 0:
        return out
    workers = workers or min(os.cpu_count() or 1, 8)

    def job(i):
        return i, _one_patch(p[i], None if m is None else m[i], sp, convention, method)

    if workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(job, range(n)))
    else:
        results = [job(i) for i in range(n)]
    for i, vals in results:
        for k, v in zip(BATCH_KEYS, vals):
            out[k][i] = v
    bad = int(np.count_nonzero(~np.isfinite(out["Tb.N"])))
    if bad:
        warnings.warn(f"{bad} of {n} patches have an empty, all-bone or all-marrow ROI; their undefined "
                      "parameters are NaN", MorphometryWarning, stacklevel=2)
    return out
