"""Combine per-bone rigid motions into one displacement field, and keep bones rigid in a deformation.

ITK has no piecewise-rigid transform, so per-bone results become a displacement field on a grid
that covers the bones plus a margin: inside (and within ``rigid_margin_mm`` of) a bone the motion
is exactly that bone's rigid transform; between bones the motions are blended by inverse distance
(weight ``1/d^p``); at ``blend_radius_mm`` from every bone the identity (the global transform)
takes over, and outside the grid the displacement is zero. Trilinear interpolation reproduces an
affine motion exactly, so points whose grid neighbours all lie in one bone's rigid zone move
exactly rigidly. Hand-written because no library offers inverse-distance blending of transforms.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def field_grid(mask: sitk.Image, spacing_mm: float, margin_mm: float) -> sitk.Image:
    """A reference grid (axis-aligned with ``mask``'s direction) around its non-zero voxels."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    bb = stats.GetBoundingBox(1)  # x0, y0, z0, sx, sy, sz (index space)
    lo = np.array(bb[:3], float)
    hi = lo + np.array(bb[3:], float) - 1
    sp = np.asarray(mask.GetSpacing())
    lo_i = np.maximum(lo - margin_mm / sp, 0)
    hi_i = np.minimum(hi + margin_mm / sp, np.asarray(mask.GetSize()) - 1)
    origin = mask.TransformContinuousIndexToPhysicalPoint(lo_i.tolist())
    size = np.maximum(np.ceil((hi_i - lo_i) * sp / spacing_mm).astype(int) + 1, 2)
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetOrigin(origin)
    ref.SetDirection(mask.GetDirection())
    return ref


def grid_points(ref: sitk.Image) -> np.ndarray:
    """Physical coordinates of every node of ``ref``, shape (z, y, x, 3) in LPS (x, y, z) order."""
    size = ref.GetSize()
    idx = np.stack(np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij"), -1)
    idx = idx[..., ::-1].astype(float)  # (i, j, k)
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    return np.asarray(ref.GetOrigin()) + (idx * np.asarray(ref.GetSpacing())) @ d.T


def bone_weights(ref: sitk.Image, masks: list[sitk.Image], *, power: float, radius_mm: float,
                 rigid_margin_mm: float) -> np.ndarray:
    """Normalised weights (n_bones + 1, z, y, x); the last row is the identity's weight."""
    ws = []
    for m in masks:
        on_ref = sitk.Resample(sitk.Cast(m > 0, sitk.sitkUInt8), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        if not np.any(sitk.GetArrayViewFromImage(on_ref)):
            d = np.full(sitk.GetArrayViewFromImage(ref).shape, 1e6)
        else:
            d = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
                on_ref, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
        d = np.maximum(d - rigid_margin_mm, 0.0)
        ws.append(1.0 / (d ** power + 1e-9))
    ws.append(np.full(ws[0].shape, 1.0 / radius_mm ** power))
    w = np.stack(ws)
    return w / w.sum(0, keepdims=True)


def apply_points(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    """``tx`` applied to points (..., 3); fast path for matrix transforms."""
    flat = pts.reshape(-1, 3)
    if isinstance(tx, (sitk.Euler3DTransform, sitk.AffineTransform, sitk.VersorRigid3DTransform)):
        m = np.asarray(tx.GetMatrix()).reshape(3, 3)
        c = np.asarray(tx.GetCenter())
        t = np.asarray(tx.GetTranslation())
        return ((flat - c) @ m.T + c + t).reshape(pts.shape)
    return np.array([tx.TransformPoint(p) for p in flat.tolist()]).reshape(pts.shape)


def field_transform(ref: sitk.Image, disp_zyx3: np.ndarray) -> sitk.DisplacementFieldTransform:
    """A displacement-field transform from an array (z, y, x, 3) on ``ref``'s grid."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(disp_zyx3, dtype=np.float64), isVector=True)
    img.CopyInformation(ref)
    return sitk.DisplacementFieldTransform(img)


def blend_rigid(ref: sitk.Image, masks: list[sitk.Image], rigids: list[sitk.Transform], *, power: float,
                radius_mm: float, rigid_margin_mm: float) -> sitk.DisplacementFieldTransform:
    """One displacement field blending the bones' rigid transforms (each mapping CT → CT)."""
    pts = grid_points(ref)
    w = bone_weights(ref, masks, power=power, radius_mm=radius_mm, rigid_margin_mm=rigid_margin_mm)
    disp = np.zeros(pts.shape)
    for wb, tx in zip(w[:-1], rigids):
        disp += wb[..., None] * (apply_points(tx, pts) - pts)
    return field_transform(ref, disp)


def kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best rigid (rotation ``r``, translation ``t``) with ``dst ≈ src @ r.T + t`` (least squares)."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    s = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    r = vt.T @ s @ u.T
    return r, cd - r @ cs


def rigidify(ref: sitk.Image, disp_zyx3: np.ndarray, masks: list[sitk.Image], *, strength: float, power: float,
             radius_mm: float, rigid_margin_mm: float) -> np.ndarray:
    """Replace the displacement inside each bone by its best rigid fit (blended out with distance).

    ``strength`` 1 makes every bone move exactly rigidly; 0 leaves the deformation unchanged.
    """
    if strength <= 0:
        return disp_zyx3
    pts = grid_points(ref)
    w = bone_weights(ref, masks, power=power, radius_mm=radius_mm, rigid_margin_mm=rigid_margin_mm)
    out = disp_zyx3.copy()
    for wb in w[:-1]:
        inside = wb > 0.999
        if inside.sum() < 4:
            continue
        r, t = kabsch(pts[inside], pts[inside] + disp_zyx3[inside])
        rigid = pts @ r.T + t - pts
        out += strength * wb[..., None] * (rigid - disp_zyx3)
    return out
