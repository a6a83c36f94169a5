"""Patch centres in the ROIs, and patch extraction on canonical grids (CT grid and MR grid through a transform).

Patch grids are axis-aligned cubes in **CT physical space (LPS)**, centred on the patch centre, with
``size`` voxels of ``extent_mm / size``. The CT patch samples the CT on that grid; the MR patch samples the MR at
``T(p)`` for every grid point ``p`` (``T`` maps CT points to MR points, ITK convention), so both patches show the
same physical block in the same voxel order.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..segmentation.geometry import crop_box, index_to_lps, spacing_zyx


def _as_lps_axes(img: sitk.Image) -> tuple[list[int], list[bool]]:
    """How to view ``img``'s numpy (z, y, x) array so that its axes run along S, P and L in that order, as those of
    an image with the identity direction: the original axis of each viewed axis, and whether it is reversed. Each
    index axis goes with the patient axis its direction lies closest to (a slightly oblique scan too)."""
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    phys = np.abs(d).argmax(axis=0)  # the patient axis (L, P, S) of each index axis (x, y, z)
    if sorted(phys) != [0, 1, 2]:  # two index axes closest to one patient axis (strongly oblique): as stored
        return [0, 1, 2], [False, False, False]
    order = [next(k for k in range(3) if phys[2 - k] == 2 - c) for c in range(3)]
    return order, [bool(d[phys[2 - k], 2 - k] < 0) for k in order]


def roi_centres(rois: sitk.Image, label: int, stride_mm: float, extent_mm: float, min_fraction: float,
                max_count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres (LPS mm, (n, 3)) on a regular grid of ``stride_mm`` inside ROI ``label``.

    A centre is valid when at least ``min_fraction`` of the patch cube around it is in the ROI. At most
    ``max_count`` are kept (a random subset, reproducible from ``rng``). Returns ``(centres, n_valid)``. The grid
    is laid on the ROI's array viewed with its axes along S, P and L (:func:`_as_lps_axes`), so that the centres do
    not depend on the order in which the image's slices, rows and columns are stored.
    """
    order, flips = _as_lps_axes(rois)
    stored = sitk.GetArrayViewFromImage(rois)
    view = np.transpose(stored, order)[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    arr = view == label
    if not arr.any():
        return np.zeros((0, 3)), 0
    sp = np.asarray(spacing_zyx(rois))[order]
    half = np.ceil(0.5 * extent_mm / sp).astype(int)
    box = crop_box(arr, half)
    sub = arr[box].astype(np.float32)
    size = np.maximum(1, np.round(extent_mm / sp).astype(int))
    frac = ndi.uniform_filter(sub, size=tuple(size), mode="constant")
    step = np.maximum(1, np.round(stride_mm / sp).astype(int))
    grid = np.zeros(sub.shape, bool)
    # anchor the grid on the ROI's first voxel so that results do not depend on the crop
    grid[::step[0], ::step[1], ::step[2]] = True
    ok = grid & sub.astype(bool) & (frac >= min_fraction)
    zyx = np.argwhere(ok) + np.array([b.start for b in box])
    n_valid = len(zyx)
    if n_valid > max_count:
        zyx = zyx[np.sort(rng.choice(n_valid, max_count, replace=False))]
    stored_zyx = np.empty_like(zyx)  # back to the stored array's indices
    for c, (k, f) in enumerate(zip(order, flips)):
        stored_zyx[:, k] = stored.shape[k] - 1 - zyx[:, c] if f else zyx[:, c]
    return index_to_lps(rois, stored_zyx), n_valid


def patch_reference(centre_lps, size: int, extent_mm: float) -> sitk.Image:
    """An empty axis-aligned (identity direction) cube grid of ``size``³ voxels centred on ``centre_lps``."""
    sp = extent_mm / size
    ref = sitk.Image(size, size, size, sitk.sitkUInt8)
    ref.SetSpacing((sp, sp, sp))
    ref.SetOrigin(tuple(float(c) - 0.5 * extent_mm + 0.5 * sp for c in centre_lps))
    return ref


def cut(image: sitk.Image, centres: np.ndarray, size: int, extent_mm: float, *,
        transform: sitk.Transform | None = None, interpolator=sitk.sitkLinear, default: float = 0.0,
        pixel_type=sitk.sitkFloat32) -> np.ndarray:
    """Patches (n, size, size, size) (z, y, x) of ``image`` at CT-space ``centres``, through ``transform``."""
    if transform is None and interpolator in (sitk.sitkLinear, sitk.sitkNearestNeighbor):
        return _cut_same_space(image, centres, size, extent_mm, order=1 if interpolator == sitk.sitkLinear else 0,
                               default=default, dtype=np.float32 if pixel_type == sitk.sitkFloat32 else np.uint8)
    tx = transform if transform is not None else sitk.Transform()
    out = np.empty((len(centres), size, size, size), np.float32 if pixel_type == sitk.sitkFloat32 else np.uint8)
    rs = sitk.ResampleImageFilter()
    rs.SetTransform(tx)
    rs.SetInterpolator(interpolator)
    rs.SetDefaultPixelValue(default)
    rs.SetOutputPixelType(pixel_type)
    for i, c in enumerate(centres):
        rs.SetReferenceImage(patch_reference(c, size, extent_mm))
        out[i] = sitk.GetArrayFromImage(rs.Execute(image))  # a copy: a view would outlive the temporary image
    return out


def cut_ct(ct: sitk.Image, centres: np.ndarray, size: int, extent_mm: float) -> np.ndarray:
    """CT patches as the students see them, in training and inference alike: :func:`cut` (air outside the image)
    floored at :data:`ctsma.io.images.AIR_FLOOR_HU`, so padding outside a scanner's reconstruction circle
    (-2048, -3024 HU) reads as air."""
    from ..io.images import AIR_FLOOR_HU

    return np.maximum(cut(ct, centres, size, extent_mm, default=-1000.0), np.float32(AIR_FLOOR_HU))


def _cut_same_space(image: sitk.Image, centres: np.ndarray, size: int, extent_mm: float, *, order: int,
                    default: float, dtype) -> np.ndarray:
    """:func:`cut` without a transform, vectorised over all patches (scipy map_coordinates; same result as
    SimpleITK's linear / nearest-neighbour resampling, far fewer calls).

    As in ITK, a point is inside the image when its continuous index lies in [-0.5, size - 0.5) along every axis,
    and the interpolation clamps its neighbours to the edge voxels there; scipy's ``constant`` mode alone would
    give ``default`` in the outer half voxel."""
    from ..segmentation.geometry import lps_to_index

    n = len(centres)
    out = np.empty((n, size, size, size), dtype)
    if n == 0:
        return out
    sp = extent_mm / size
    off = -0.5 * extent_mm + 0.5 * sp + sp * np.arange(size)
    zz, yy, xx = np.meshgrid(off, off, off, indexing="ij")
    grid = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], -1)            # LPS offsets (x, y, z), z slowest
    arr = sitk.GetArrayViewFromImage(image)
    hi = np.asarray(arr.shape, float)[:, None] - 1.0
    step = max(1, 2_000_000 // grid.shape[0])
    for a in range(0, n, step):
        pts = (centres[a:a + step, None, :] + grid[None]).reshape(-1, 3)
        idx = lps_to_index(image, pts).T                                  # (3, m) in (z, y, x)
        inside = np.all((idx >= -0.5) & (idx < hi + 0.5), axis=0)
        if order == 0:
            idx = np.floor(idx + 0.5)
        vals = ndi.map_coordinates(arr, np.clip(idx, 0.0, hi), order=order, mode="nearest", prefilter=False)
        vals[~inside] = default
        out[a:a + step] = vals.reshape(-1, size, size, size).astype(dtype, copy=False)
    return out


def inside_fraction(image: sitk.Image, centres: np.ndarray, extent_mm: float, transform=None) -> np.ndarray:
    """Fraction of each patch's 8 corners that map inside ``image`` (1.0 = the whole cube is in the image)."""
    tx = transform if transform is not None else sitk.Transform()
    h = 0.5 * extent_mm
    corners = np.array([[sx, sy, sz] for sx in (-h, h) for sy in (-h, h) for sz in (-h, h)])
    size = np.asarray(image.GetSize())
    out = np.empty(len(centres))
    for i, c in enumerate(centres):
        n_in = 0
        for d in corners:
            q = tx.TransformPoint(tuple(float(v) for v in (c + d)))
            idx = np.asarray(image.TransformPhysicalPointToContinuousIndex(q))
            n_in += bool(np.all(idx >= -0.5) and np.all(idx <= size - 0.5))
        out[i] = n_in / len(corners)
    return out


def relative_positions(centres_lps: np.ndarray, roi_names) -> np.ndarray:
    """Patch centres relative to the centroid of their bone's two ROIs, in RAS mm (as in the patch dataset)."""
    ras = np.asarray(centres_lps, float) * np.array([-1.0, -1.0, 1.0])
    rel = np.zeros_like(ras)
    names = np.asarray(roi_names)
    for group in (("MFC", "LFC"), ("MTP", "LTP")):
        sel = np.isin(names, group)
        if sel.any():
            rel[sel] = ras[sel] - ras[sel].mean(0)
    return rel
