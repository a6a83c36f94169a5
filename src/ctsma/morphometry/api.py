"""Public entry point :func:`measure`: every parameter of one image (many patches: :mod:`.batch`)."""

from __future__ import annotations

from .binarise import binarise, _as_array
from .parameters import DEFAULT_BINS, measure_binary
from .validate import check_convention, check_method, check_run_options, check_spacing


def measure(image, spacing_zyx=None, mask=None, *, modality: str = "binary", threshold=None,
            method: str = "global", n4: bool = False, convention: str = "default", spheres: str = "roi",
            histogram_bins=DEFAULT_BINS, smooth_sigma_vox: float = 0.0, window_mm: float | None = None,
            threads: int = 1, thickness_method: str = "fast", return_maps: bool = False, slabs="auto",
            progress=None, shape: bool = False, **binarise_kw):
    """Trabecular parameters of ``image`` inside ``mask``.

    ``image`` is a (z, y, x) array (then ``spacing_zyx`` in mm is required) or a SimpleITK image (spacing
    from it). ``modality`` is ``binary`` (already segmented, bone = 1), ``ct``/``microct`` (bone bright) or
    ``mr`` (bone dark); grey images are binarised by :func:`binarise` (``threshold`` None/"otsu"/number,
    ``method`` global/local, ``n4``). ``mask`` (array or SimpleITK image on the same grid, any shape) is
    the ROI; None means the whole image.

    Returns a dict with ``BV/TV, Tb.Th, Tb.Sp, Tb.N, BS/BV, Conn.D, Tb.Th.sd, Tb.Sp.sd, Tb.N.formula,
    Tb.N.plate, convention, binarisation, spacing, roi_voxels, histograms`` (lengths in mm, Tb.N in 1/mm,
    Conn.D in 1/mm³). Undefined values (e.g. Tb.Sp of an all-bone ROI) are NaN with a warning.
    ``shape=True`` adds the structure model index ``SMI`` and the degree of anisotropy ``DA`` (with
    ``DA.main_direction``), see :mod:`.shape`.
    With ``return_maps=True`` it returns ``(result, {"thickness", "separation", "bone"})``.

    Over the memory budget (``CTSMA_MEMORY_GB``) the local thickness is computed in z-slabs with the same
    results; ``slabs`` and ``progress`` are passed to :func:`~.parameters.measure_binary`.
    """
    if mask is not None and hasattr(image, "GetOrigin") and hasattr(mask, "GetOrigin"):
        from ..io.images import check_same_geometry
        check_same_geometry(image, mask, what_a="image", what_b="ROI mask")
    arr, sp = _as_array(image, spacing_zyx)
    sp = check_spacing(sp)
    if mask is not None:
        mask, _ = _as_array(mask, sp)
    check_convention(convention)
    check_method(thickness_method)  # before binarising (N4 can take a while)
    check_run_options(threads, histogram_bins)
    bone, info = binarise(arr, sp, mask, modality=modality, threshold=threshold, method=method, n4=n4,
                          smooth_sigma_vox=smooth_sigma_vox, window_mm=window_mm, **binarise_kw)
    out = measure_binary(bone, sp, mask, convention=convention, spheres=spheres, histogram_bins=histogram_bins,
                         threads=threads, method=thickness_method, return_maps=return_maps, slabs=slabs,
                         progress=progress, shape=shape)
    res, maps = out if return_maps else (out, None)
    res["binarisation"] = info
    if return_maps:
        maps["bone"] = bone
        return res, maps
    return res
