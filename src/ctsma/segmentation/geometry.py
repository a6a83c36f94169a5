"""Small geometry helpers shared by bone segmentation and ROIs (index <-> LPS physical coordinates).

numpy arrays from SimpleITK are (z, y, x); SimpleITK indices, spacing and points are (x, y, z).
Every helper here says which order it takes.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def index_to_lps(img: sitk.Image, zyx: np.ndarray) -> np.ndarray:
    """(n, 3) numpy (z, y, x) voxel indices -> (n, 3) LPS points (x, y, z) in mm."""
    zyx = np.asarray(zyx, float).reshape(-1, 3)
    ijk = zyx[:, ::-1]
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    return np.asarray(img.GetOrigin(), float) + (ijk * np.asarray(img.GetSpacing(), float)) @ d.T


def lps_to_index(img: sitk.Image, pts: np.ndarray) -> np.ndarray:
    """(n, 3) LPS points (x, y, z) -> (n, 3) continuous numpy (z, y, x) indices."""
    pts = np.asarray(pts, float).reshape(-1, 3)
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    ijk = ((pts - np.asarray(img.GetOrigin(), float)) @ d) / np.asarray(img.GetSpacing(), float)
    return ijk[:, ::-1]


def spacing_zyx(img: sitk.Image) -> tuple[float, float, float]:
    """Voxel spacing in numpy (z, y, x) order."""
    return tuple(float(s) for s in img.GetSpacing()[::-1])  # type: ignore[return-value]


def axial_axis(img: sitk.Image) -> int:
    """The numpy axis (0, 1 or 2 of a (z, y, x) array) closest to the physical superior-inferior axis."""
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    k = int(np.argmax(np.abs(d[2, :])))  # index axis (x, y, z order) most aligned with LPS z
    return 2 - k


def like(arr: np.ndarray, ref: sitk.Image, dtype=np.uint8) -> sitk.Image:
    """A numpy (z, y, x) array as a SimpleITK image with the geometry of ``ref``."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr.astype(dtype, copy=False)))
    out.CopyInformation(ref)
    return out


def edt_inside(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm) from each voxel inside ``mask`` to the nearest voxel outside it (0 outside).

    Uses the ``edt`` package (exact, anisotropic, multi-label aware), far faster than scipy on large volumes.
    Image borders count as inside (``black_border=False``), so bones cut by the field of view do not get a
    false surface at the border.
    """
    import edt

    return edt.edt(np.ascontiguousarray(mask, dtype=np.uint8), anisotropy=tuple(float(s) for s in spacing),
                   black_border=False, parallel=1)


def fill_holes(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask, structure)``, the same array, 2–4 times faster on a whole CT.

    scipy fills by dilating the background from outside the array, one voxel layer per pass. Here the background
    is labelled once (``ndimage.label``, same ``structure``) and every component that does not reach the array's
    border is a hole. Only the faces that ``structure`` connects across count as border: with an in-plane
    structure, the first and last slices do not (as in scipy). Structures other than a symmetric 3 × ... × 3 one
    go to scipy.
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask, bool)
    st = ndi.generate_binary_structure(mask.ndim, 1) if structure is None else np.asarray(structure, bool)
    if st.shape != (3,) * mask.ndim or not np.array_equal(st, st[(slice(None, None, -1),) * mask.ndim]):
        return ndi.binary_fill_holes(mask, structure=st)
    lab, n = ndi.label(~mask, st)
    outside = np.zeros(n + 1, bool)
    outside[0] = True  # label 0 is the mask itself
    for ax in range(mask.ndim):
        ends = np.moveaxis(st, ax, 0)
        if not (ends[0].any() or ends[-1].any()):
            continue  # no connection across this axis: its end faces do not touch the outside
        for end in (0, -1):
            outside[np.unique(np.take(lab, end, axis=ax))] = True
    return mask | ~outside[lab]


def crop_box(mask: np.ndarray, margin) -> tuple[slice, ...]:
    """The bounding box of ``mask``'s nonzero voxels grown by ``margin`` voxels per axis (clipped to the array).

    From the mask's projections on each axis (a whole CT's ROI mask in a tenth of the time ``np.argwhere`` takes).
    An empty mask raises ``ValueError``."""
    nz = np.asarray(mask) > 0
    margin = np.broadcast_to(np.asarray(margin, int), (nz.ndim,))
    out = []
    for ax in range(nz.ndim):
        idx = np.flatnonzero(nz.any(axis=tuple(a for a in range(nz.ndim) if a != ax)))
        if not len(idx):
            raise ValueError("crop_box of an empty mask")
        out.append(slice(int(max(idx[0] - margin[ax], 0)), int(min(idx[-1] + margin[ax] + 1, nz.shape[ax]))))
    return tuple(out)
