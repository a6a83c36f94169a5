"""Input checks shared by the morphometry functions: one-line user errors, never a traceback."""

from __future__ import annotations

import numpy as np

from ..errors import InputImageError, UserError


class MorphometryError(UserError):
    """Morphometry inputs or settings that cannot give a meaningful result."""


def check_spacing(spacing_zyx) -> tuple[float, float, float]:
    try:
        sp = tuple(float(s) for s in spacing_zyx)
    except (TypeError, ValueError):
        raise MorphometryError(f"spacing must be three numbers in mm (z, y, x), got {spacing_zyx!r}") from None
    if len(sp) != 3:
        raise MorphometryError(f"spacing must have three values (z, y, x) in mm, got {len(sp)}")
    if not all(np.isfinite(sp)) or min(sp) <= 0:
        raise MorphometryError(f"spacing {sp} mm is invalid: every value must be finite and > 0")
    if max(sp) > MAX_ANISOTROPY * min(sp):
        raise MorphometryError(f"spacing {sp} mm: voxels over {MAX_ANISOTROPY:g} times longer along one axis than "
                               "along another cannot resolve a structure in 3D; check the spacing in the header")
    return _snap_equal(sp)  # type: ignore[return-value]


MAX_ANISOTROPY = 100.0
SNAP_RELATIVE = 1e-5


def _snap_equal(sp: tuple) -> tuple:
    """Spacings within :data:`SNAP_RELATIVE` of each other made equal (their mean).

    On an isotropic grid many voxel centres lie exactly on a sphere's surface; spacings that differ only by
    the rounding of a file header (NIfTI stores float32; DICOM slice positions are rounded) would decide those ties
    one way on one axis and the other way on the next, and move Tb.Th by up to about 1 % between two copies of
    the same image. The change of scale is at most 1e-5, far below any measurement's precision."""
    order = sorted(range(len(sp)), key=lambda i: sp[i])
    clusters = [[order[0]]]
    for i in order[1:]:  # single linkage over the sorted values: one cluster, one mean, whatever the order
        if sp[i] - sp[clusters[-1][-1]] <= SNAP_RELATIVE * sp[clusters[-1][-1]]:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    out = list(sp)
    for c in clusters:
        if len(c) > 1:
            mean = float(np.mean([sp[i] for i in c]))
            for i in c:
                out[i] = mean
    return tuple(out)


def check_convention(convention: str) -> str:
    from .thickness import CONVENTIONS
    if convention not in CONVENTIONS:
        raise MorphometryError(f"unknown convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    return convention


def check_method(method: str) -> str:
    """The local-thickness method, ``fast`` or ``exact`` (a misspelt one ran ``fast`` and was recorded as given)."""
    from .thickness import METHODS
    if method not in METHODS:
        raise MorphometryError(f"unknown local-thickness method {method!r}; use 'fast' or 'exact'")
    return method


def check_run_options(threads, histogram_bins) -> None:
    """Refuse a thread count that is not a whole number from 1, and histogram bins numpy cannot use (they failed
    with numpy's own error after the whole computation; threads <= 0 were taken as one)."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise MorphometryError(f"threads must be a whole number from 1, got {threads!r}")
    try:
        np.histogram_bin_edges(np.zeros(2), bins=histogram_bins)
    except (ValueError, TypeError) as exc:
        raise MorphometryError(f"histogram_bins {histogram_bins!r} cannot bin the thickness values: {exc}") from None


def check_volume(arr, what: str = "image") -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 3:
        raise InputImageError(f"{what} is {a.ndim}D (shape {a.shape}); a 3D volume (z, y, x) is required")
    if min(a.shape) < 2:
        raise InputImageError(f"{what} has shape {a.shape}: a 3D volume needs at least 2 voxels along each axis "
                              "(a single slice is a 2D image)")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise InputImageError(f"{what} has {bad:,} non-finite voxels (NaN or inf); replace them with a finite value "
                              "first (a mask does not exclude them: binarisation reads the whole image)")
    if a.dtype.kind not in "biuf":
        raise InputImageError(f"{what} has unsupported voxel type {a.dtype}")
    return a


def check_binary(arr, what: str = "binary image") -> np.ndarray:
    a = check_volume(arr, what)
    if a.dtype == bool:
        return a
    if not ((a == 0) | (a == 1)).all():
        raise InputImageError(f"{what} is not binary (values other than 0 and 1); binarise it first "
                              "or give a grey-level modality")
    return a.astype(bool)


def check_mask(mask, shape, what: str = "ROI mask") -> np.ndarray:
    if mask is None:
        return np.ones(shape, bool)
    try:
        import SimpleITK as sitk
        if isinstance(mask, sitk.Image):
            mask = sitk.GetArrayFromImage(mask)
    except ImportError:  # pragma: no cover
        pass
    m = check_volume(mask, what)
    if m.shape != tuple(shape):
        raise InputImageError(f"{what} has shape {m.shape} (z, y, x) but the image has {tuple(shape)}; "
                              "they must share the same grid")
    m = m != 0
    if not m.any():
        raise MorphometryError(f"{what} is empty: no voxel is inside the ROI")
    return m
