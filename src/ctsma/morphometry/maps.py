"""Sliding-window parameter maps (BV/TV, Tb.Th, Tb.Sp, Tb.N) in the image's geometry.

The local-thickness maps are computed once over the whole ROI, then each window's Tb.Th is the mean of
the thickness map over the bone voxels in the window (and Tb.Sp likewise over marrow). This is the same
estimator as measuring each window on its own, except that spheres are not cut at the window's faces,
which removes the truncation bias of small windows; it costs three box filters instead of one local-
thickness run per window. The window of sample ``i`` covers voxels ``i - w//2 .. i - w//2 + w - 1``: centred
on voxel ``i`` for an odd width ``w``, half a voxel before it for an even one (:func:`window_origin`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .parameters import measure_binary
from .validate import MorphometryError, check_binary, check_mask, check_spacing


def _box_sum(a: np.ndarray, size) -> np.ndarray:
    return ndimage.uniform_filter(a.astype(np.float64), size=size, mode="constant") * float(np.prod(size))


def _window_and_stride(window, stride) -> tuple[np.ndarray, np.ndarray]:
    """``window`` and ``stride`` as (z, y, x) voxel counts: whole positive numbers, one or three each (a window of
    9.5 was cut to 9)."""
    for name, value in (("window", window), ("stride", stride)):
        try:
            given = np.asarray(value, float)
        except (TypeError, ValueError):
            given = np.array(np.nan)
        if given.ndim > 1 or given.size not in (1, 3) or not np.all(np.isfinite(given) & (given == np.round(given))):
            raise MorphometryError(f"{name} must be a whole number of voxels or three of them (z, y, x), got "
                                   f"{value!r}")
    win = np.broadcast_to(np.asarray(window, int), (3,)).copy()
    st = np.broadcast_to(np.asarray(stride, int), (3,)).copy()
    if (win < 1).any() or (st < 1).any():
        raise MorphometryError(f"window {tuple(map(int, win))} and stride {tuple(map(int, st))} must be positive "
                               "voxel counts")
    return win, st


def sliding_window_maps(bone, spacing_zyx, window, stride=1, mask=None, *, convention: str = "default",
                        min_roi_fraction: float = 0.5, thickness_maps=None) -> dict[str, np.ndarray]:
    """Parameter maps of windows of ``window`` voxels (int or (z, y, x)), sampled every ``stride`` voxels.

    Returns float32 arrays ``{"BV/TV", "Tb.Th", "Tb.Sp", "Tb.N"}`` of shape ``ceil(shape / stride)``; the
    sample ``[k]`` is the window of voxel ``k * stride`` (centred on it for odd widths, half a voxel before it
    along an axis of even width), so a map has the image's direction, a spacing of ``stride * spacing`` and the
    origin :func:`window_origin`. Windows with less than ``min_roi_fraction`` of their
    voxels in the ROI, or with no bone (or no marrow) for Tb.Th (Tb.Sp), are NaN.
    ``thickness_maps`` may pass precomputed ``{"thickness", "separation"}`` maps from :func:`measure_binary`.
    """
    b = check_binary(bone, "binary bone image")
    sp = check_spacing(spacing_zyx)
    roi = check_mask(mask, b.shape)
    win, st = _window_and_stride(window, stride)
    if thickness_maps is None:
        _, thickness_maps = measure_binary(b, sp, roi, convention=convention, surface=False, return_maps=True)
    return _window_maps(b, roi, thickness_maps["thickness"], thickness_maps["separation"], win, st, min_roi_fraction)


def _window_maps(b, roi, th_map, sp_map, win, st, min_roi_fraction, z_first=0, n_out=None):
    """The maps of the windows centred on planes ``z_first, z_first + st[0], ...`` (``n_out`` of them) of ``b``."""
    bone_roi = b & roi
    marrow = roi & ~b
    n_roi = _box_sum(roi, win)
    n_b = _box_sum(bone_roi, win)
    n_m = n_roi - n_b
    s_th = _box_sum(np.where(bone_roi, th_map, 0), win)
    s_sp = _box_sum(np.where(marrow, sp_map, 0), win)
    sub = (slice(int(z_first), None, int(st[0])), slice(0, None, int(st[1])), slice(0, None, int(st[2])))
    n_roi, n_b, n_m, s_th, s_sp = (x[sub][:n_out] for x in (n_roi, n_b, n_m, s_th, s_sp))
    ok = n_roi >= min_roi_fraction * float(np.prod(win)) - 1e-6
    with np.errstate(invalid="ignore", divide="ignore"):
        # a window without bone reads 0, not the box filter's rounding of its zero sum (down to -3e-17)
        bvtv = np.where(ok, np.where(n_b > 0.5, n_b / n_roi, 0.0), np.nan)
        th = np.where(ok & (n_b > 0.5), s_th / n_b, np.nan)
        sep = np.where(ok & (n_m > 0.5), s_sp / n_m, np.nan)
        tbn = 1.0 / (th + sep)
    return {"BV/TV": bvtv.astype(np.float32), "Tb.Th": th.astype(np.float32), "Tb.Sp": sep.astype(np.float32),
            "Tb.N": tbn.astype(np.float32)}


def window_chunk_planes(slab_budget: float, plane_voxels: int, window, stride, bytes_per_voxel: float = 64.0) -> int:
    """Output planes per chunk of :func:`sliding_window_chunks` that fit ``slab_budget`` bytes (0 if none)."""
    w = int(np.broadcast_to(np.asarray(window, int), (3,))[0])
    s = int(np.broadcast_to(np.asarray(stride, int), (3,))[0])
    planes = int(slab_budget // (plane_voxels * bytes_per_voxel)) - 2 * (w // 2 + 1)
    return max(0, planes // s)


def sliding_window_chunks(bone, spacing_zyx, window, stride=1, mask=None, *, thickness_maps, z_chunk: int,
                          min_roi_fraction: float = 0.5):
    """:func:`sliding_window_maps` in chunks of ``z_chunk`` output planes: yields ``(o0, o1, maps)``.

    Each chunk filters only the planes its windows reach (half a window beyond its sample planes), so the
    working memory is that of a slab. Values equal the whole-image maps up to the rounding of the box filter's
    running sums (float64, then stored as float32).
    """
    b = check_binary(bone, "binary bone image")
    check_spacing(spacing_zyx)
    roi = check_mask(mask, b.shape)
    win, st = _window_and_stride(window, stride)
    z_chunk = max(1, int(z_chunk))
    nz = b.shape[0]
    n_out = -(-nz // int(st[0]))
    reach = int(win[0]) // 2 + 1
    th, sp_map = thickness_maps["thickness"], thickness_maps["separation"]
    for o0 in range(0, n_out, z_chunk):
        o1 = min(o0 + z_chunk, n_out)
        zc0, zc1 = o0 * int(st[0]), (o1 - 1) * int(st[0])
        lo, hi = max(zc0 - reach, 0), min(zc1 + reach + 1, nz)
        yield o0, o1, _window_maps(b[lo:hi], roi[lo:hi], th[lo:hi], sp_map[lo:hi], win, st, min_roi_fraction,
                                   z_first=zc0 - lo, n_out=o1 - o0)


def window_origin(reference, window) -> tuple:
    """The physical centre of the first window (voxel 0's) on ``reference``'s grid (an image or a
    :class:`ctsma.io.memory.Geometry`): voxel 0 itself, moved half a voxel back along each axis where the window
    (voxels, int or (z, y, x)) has an even width."""
    shift = np.where(np.broadcast_to(np.asarray(window, int), (3,))[::-1] % 2 == 0, -0.5, 0.0)  # x, y, z
    d = np.asarray(reference.GetDirection(), float).reshape(3, 3)
    return tuple(float(v) for v in np.asarray(reference.GetOrigin(), float)
                 + d @ (np.asarray(reference.GetSpacing(), float) * shift))


def map_to_image(arr: np.ndarray, reference, stride=1, window=1):
    """A SimpleITK image of ``arr`` (z, y, x): the windows of ``window`` voxels sampled every ``stride`` voxels of
    ``reference``'s grid."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    st = np.broadcast_to(np.asarray(stride, int), (3,))[::-1]  # x, y, z
    img.SetOrigin(window_origin(reference, window))
    img.SetDirection(reference.GetDirection())
    img.SetSpacing(tuple(float(s) * float(k) for s, k in zip(reference.GetSpacing(), st)))
    return img
