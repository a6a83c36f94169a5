"""Standard trabecular parameters (Bouxsein et al. 2010 nomenclature) from a binary image and an ROI.

* ``BV/TV``: bone voxels in the ROI / ROI voxels (exact count).
* ``Tb.Th`` / ``Tb.Sp``: mean (and SD, histogram) of the local-thickness diameter over the bone / marrow
  voxels of the ROI (see :mod:`.thickness`); the marrow space is the non-bone part of the ROI.
* ``Tb.N`` = 1 / (Tb.Th + Tb.Sp) (``Tb.N.formula``); the plate-model value BV/TV / Tb.Th is given as
  ``Tb.N.plate``.
* ``BS/BV``: area of a marching-cubes mesh of the bone in the ROI (scikit-image, in mm) over bone volume.
* ``Conn.D``: (1 - χ) / TV, with χ the Euler characteristic of the 26-connected bone in the ROI
  (scikit-image), no edge correction.

A volume whose whole-image estimate exceeds the memory budget is measured in z-slabs (:mod:`.slabs`), with the
same results (``slabs`` argument of :func:`measure_binary`).
"""

from __future__ import annotations

import warnings

import numpy as np

from .thickness import _scaled, _thickness_from_dsq, distance_sq, distance_sq_pair, unit_spacing
from .validate import check_binary, check_convention, check_mask, check_method, check_run_options, check_spacing

TBN_FORMULA = "1/(Tb.Th+Tb.Sp)"
DEFAULT_BINS = 32


class MorphometryWarning(UserWarning):
    """A parameter is undefined for this input (e.g. Tb.Sp of an all-bone ROI) and was set to NaN."""


def phase_thickness(phase: np.ndarray, spacing_zyx, convention: str, threads: int = 1,
                    method: str = "fast") -> np.ndarray:
    """Local thickness diameter map (mm) of one phase (bool array), 0 outside it."""
    if not phase.any():
        return np.zeros(phase.shape, np.float32)
    if phase.all():  # no boundary: undefined
        return np.full(phase.shape, np.nan, np.float32)
    su, unit = unit_spacing(spacing_zyx)
    return _scaled(_thickness_from_dsq(phase, distance_sq(phase, su, threads=threads), su, convention, method,
                                       threads), unit)


def phase_pair_thickness(bone: np.ndarray, marrow: np.ndarray, spacing_zyx, convention: str, threads: int = 1,
                         method: str = "fast"):
    """:func:`phase_thickness` of two disjoint phases (bool arrays), sharing one distance transform.

    The maps are bit for bit those of two :func:`phase_thickness` calls.
    """
    ok = [p.any() and not p.all() for p in (bone, marrow)]
    if not all(ok):
        return tuple(phase_thickness(p, spacing_zyx, convention, threads, method) for p in (bone, marrow))
    su, unit = unit_spacing(spacing_zyx)
    d = distance_sq_pair(bone, marrow, su, threads=threads)
    th = _thickness_from_dsq(bone, np.where(bone, d, np.float32(0)), su, convention, method, threads)
    np.copyto(d, 0, where=~marrow)  # now the marrow's own distance map
    return _scaled(th, unit), _scaled(_thickness_from_dsq(marrow, d, su, convention, method, threads), unit)


def spacing_parameters(res: dict, phases: dict, *, stacklevel: int) -> None:
    """Tb.Th and Tb.Sp (mean and SD of the bone and marrow local thickness) and Tb.N, by its stated formula
    (1/(Tb.Th+Tb.Sp)) and by the plate model (BV/TV / Tb.Th), into ``res`` (which holds BV/TV).

    ``phases`` maps ``bone`` and ``marrow`` to ``(n voxels, all finite, mean, sd)``. A phase without voxels or
    without a boundary gives NaN with a warning (``stacklevel`` as seen from this function).
    """
    for key, name in (("Tb.Th", "bone"), ("Tb.Sp", "marrow")):
        n, finite, mean, sd = phases[name]
        if n and finite:
            res[key], res[key + ".sd"] = mean, sd
        else:
            why = f"the ROI has no {name} voxels" if not n else f"the {name} phase has no boundary"
            warnings.warn(f"{key} is undefined (NaN): {why}", MorphometryWarning, stacklevel=stacklevel)
            res[key] = res[key + ".sd"] = float("nan")
    th, sep = res["Tb.Th"], res["Tb.Sp"]
    res["Tb.N"] = 1.0 / (th + sep) if np.isfinite(th) and np.isfinite(sep) else float("nan")
    res["Tb.N.formula"] = TBN_FORMULA
    res["Tb.N.plate"] = res["BV/TV"] / th if np.isfinite(th) and th > 0 else float("nan")


def _crop_to(mask: np.ndarray, pad: int = 1):
    """Bounding box of ``mask`` grown by ``pad`` voxels (a tuple of slices)."""
    idx = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], np.nonzero(mask.any(axis=(0, 1)))[0]
    return tuple(slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + 1 + pad, n)) for i, n in zip(idx, mask.shape))


def _histogram(values: np.ndarray, bins) -> dict:
    if values.size == 0:
        return {"bin_edges_mm": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"bin_edges_mm": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def bone_surface(bone_roi: np.ndarray, spacing_zyx) -> float:
    """Surface area (mm²) of a marching-cubes mesh of ``bone_roi`` (padded so the mesh is closed)."""
    from skimage.measure import marching_cubes, mesh_surface_area
    if not bone_roi.any():
        return float("nan")
    sl = _crop_to(bone_roi, 0)
    vol = np.pad(bone_roi[sl], 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(vol, level=0.5, spacing=tuple(float(s) for s in spacing_zyx))
    return float(mesh_surface_area(verts, faces))


def euler_characteristic(bone_roi: np.ndarray) -> int:
    """Euler characteristic of the 26-connected foreground (6-connected background)."""
    from skimage.measure import euler_number
    if not bone_roi.any():
        return 0
    sl = _crop_to(bone_roi, 1)
    return int(euler_number(np.ascontiguousarray(bone_roi[sl]), connectivity=3))


def _slab_setting(slabs, n_voxels: int, extra_resident: float = 0.0, extra_whole: float = 0.0):
    """None (whole image), or ``(slab_budget, slab_planes, budget, resident)`` for :func:`.slabs.measure_in_slabs`.
    ``extra_whole``: bytes per voxel that only a whole-image run needs (SMI and DA)."""
    from .validate import MorphometryError
    if isinstance(slabs, str) and slabs == "never":
        return None
    if isinstance(slabs, str) and slabs == "auto":
        from ..io.memory import RESIDENT_BYTES_PER_VOXEL, estimate_bytes, memory_budget_bytes
        budget = memory_budget_bytes()
        if estimate_bytes(n_voxels, "morphometry") + n_voxels * extra_whole <= budget:
            return None
        resident = n_voxels * (RESIDENT_BYTES_PER_VOXEL["morphometry"] + extra_resident)
        return max(0.0, budget - resident), None, budget, resident
    if isinstance(slabs, (int, np.integer)) and not isinstance(slabs, bool) and slabs >= 1:
        return None, int(slabs), None, 0.0
    raise MorphometryError(f"slabs must be 'auto', 'never' or a positive number of planes, got {slabs!r}")


def slab_budget_error(exc, what: str, n_voxels: int, budget: float, resident: float):
    """The one-line :class:`MemoryBudgetError` for a :class:`.slabs.SlabMemoryError`."""
    from ..errors import MemoryBudgetError
    from ..io.memory import budget_message
    return MemoryBudgetError(budget_message(
        "morphometry", what, n_voxels, int(resident + exc.need), int(budget),
        f"in z-slabs of at least {exc.planes} planes: {exc.phase} distances reach {exc.distance_mm:.2f} mm"))


def shape_not_in_slabs(stacklevel: int) -> dict:
    """SMI and DA of a z-slab run: NaN, with a warning (they need the whole interface mesh at once)."""
    warnings.warn("SMI and DA are not computed in z-slabs (they need the whole bone surface mesh, which does not "
                  "fit the memory budget): NaN; crop the image to the ROI or raise CTSMA_MEMORY_GB",
                  MorphometryWarning, stacklevel=stacklevel)
    return {"SMI": float("nan"), "DA": float("nan"), "DA.main_direction": None}


def describe_run(res: dict, convention: str, method: str, spheres: str, sp, n_roi: int, n_bone: int,
                 voxel_mm3: float) -> None:
    """The run's settings and counts in a result dict (shared by the whole-image and the z-slab paths)."""
    res.update({"convention": convention, "thickness_method": method, "spheres": spheres,
                "spacing": [sp[2], sp[1], sp[0]], "spacing_order": "x,y,z (mm)", "roi_voxels": n_roi,
                "bone_voxels": n_bone, "TV_mm3": n_roi * voxel_mm3})


def measure_binary(bone: np.ndarray, spacing_zyx, mask=None, *, convention: str = "default",
                   spheres: str = "roi", histogram_bins=DEFAULT_BINS, surface: bool = True,
                   threads: int = 1, method: str = "fast", return_maps: bool = False, slabs="auto",
                   progress=None, shape: bool = False):
    """All parameters of a binary bone image inside an ROI; see :func:`ctsma.morphometry.measure`.

    ``shape=True`` adds ``SMI``, ``DA`` and ``DA.main_direction`` (:mod:`.shape`); in z-slabs they are NaN with a
    warning, since they need the whole interface mesh.

    ``spheres="roi"`` confines the spheres to the ROI (outside the ROI is neither bone nor marrow);
    ``"image"`` fits them in the whole image and only averages inside the ROI (the protocol of the
    peer figures on a cube minus a margin). Returns the result dict, and with ``return_maps`` also
    ``{"thickness": map_mm, "separation": map_mm}`` over the whole grid. ``method`` is the local-thickness
    method (``fast`` or ``exact``, see :func:`ctsma.morphometry.local_thickness`).

    ``slabs``: ``"auto"`` (default) measures in z-slabs when the whole-image estimate exceeds the memory budget
    (``CTSMA_MEMORY_GB``, see :mod:`ctsma.io.memory`), ``"never"`` never does, a number forces slabs of that
    many core planes. The results are the same (see :mod:`.slabs`); the result then has a ``slabs`` entry.
    ``progress(done, total, message)`` is called after each slab.
    """
    bone = check_binary(bone, "binary bone image")
    sp = check_spacing(spacing_zyx)
    check_convention(convention)
    check_method(method)
    check_run_options(threads, histogram_bins)
    roi = check_mask(mask, bone.shape)
    if spheres not in ("roi", "image"):
        from .validate import MorphometryError
        raise MorphometryError(f"spheres must be 'roi' or 'image', got {spheres!r}")
    from .shape import BYTES_PER_VOXEL as SHAPE_BYTES
    plan = _slab_setting(slabs, bone.size, 8.0 if return_maps else 0.0, SHAPE_BYTES if shape else 0.0)
    if plan is not None:
        from .slabs import ArraySink, SlabMemoryError, measure_in_slabs
        sink = ArraySink(bone.shape) if return_maps else None
        try:
            res = measure_in_slabs(bone, roi, sp, convention=convention, spheres=spheres,
                                   histogram_bins=histogram_bins, surface=surface, threads=threads, method=method,
                                   slab_budget=plan[0], slab_planes=plan[1], sink=sink, report=progress)
        except SlabMemoryError as exc:
            raise slab_budget_error(exc, "image", bone.size, plan[2], plan[3]) from None
        if shape:
            res.update(shape_not_in_slabs(stacklevel=3))
        return (res, sink.maps) if return_maps else res
    n_roi = int(np.count_nonzero(roi))
    bone_roi = bone & roi
    marrow_roi = roi & ~bone
    n_bone = int(np.count_nonzero(bone_roi))
    voxel_mm3 = float(np.prod(sp))
    res: dict = {"BV/TV": n_bone / n_roi}

    th_map = np.zeros(bone.shape, np.float32)
    sp_map = np.zeros(bone.shape, np.float32)
    if spheres == "roi":
        sl = _crop_to(roi, 1)
        th_map[sl], sp_map[sl] = phase_pair_thickness(np.ascontiguousarray(bone_roi[sl]),
                                                      np.ascontiguousarray(marrow_roi[sl]), sp, convention,
                                                      threads, method)
    else:
        th_map, sp_map = phase_pair_thickness(bone, ~bone, sp, convention, threads, method)
    th_vals = th_map[bone_roi]
    sp_vals = sp_map[marrow_roi]
    phases = {}
    for name, vals in (("bone", th_vals), ("marrow", sp_vals)):
        finite = bool(np.isfinite(vals).all())
        phases[name] = (vals.size, finite, float(vals.mean(dtype=np.float64)) if vals.size and finite else None,
                        float(vals.std(dtype=np.float64)) if vals.size and finite else None)
    spacing_parameters(res, phases, stacklevel=3)
    if surface and n_bone:
        area = bone_surface(bone_roi, sp)
        res["BS/BV"] = area / (n_bone * voxel_mm3)
    else:
        res["BS/BV"] = float("nan")
    res["Conn.D"] = (1 - euler_characteristic(bone_roi)) / (n_roi * voxel_mm3) if n_bone else float("nan")
    if shape:
        from .shape import shape_parameters
        res.update(shape_parameters(bone, roi, sp))
        if not np.isfinite(res["SMI"]):
            warnings.warn("SMI and DA are undefined (NaN): the ROI holds no bone-marrow interface",
                          MorphometryWarning, stacklevel=2)
    describe_run(res, convention, method, spheres, sp, n_roi, n_bone, voxel_mm3)
    bins_th = bins_sp = histogram_bins
    res["histograms"] = {"Tb.Th": _histogram(th_vals[np.isfinite(th_vals)], bins_th),
                         "Tb.Sp": _histogram(sp_vals[np.isfinite(sp_vals)], bins_sp)}
    if return_maps:
        return res, {"thickness": th_map, "separation": sp_map}
    return res
