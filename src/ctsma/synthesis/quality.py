"""Synthesis quality against the phantom's truth: HU MAE inside bone and soft tissue, and SSIM.

The pseudo-CT (MR frame) is brought into CT space with the phantom's TRUE transform, used here
only for scoring, never for training. Bone is the CT bone labels (or CT > 200 HU without them),
soft tissue is the rest of the body between -200 and 200 HU in the CT. SSIM (scikit-image) is
computed on HU clipped to [-1000, 2000] over the bounding box of the body, restricted to voxels
the MR covers.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from skimage.metrics import structural_similarity

from ..io.images import check_ct_intensities, read_image
from ..registration.masks import read_bone_labels
from .model import SynthesisModel


def quality(pseudo_ct: sitk.Image, ct: sitk.Image, true_ct_to_mr: sitk.Transform,
            ct_bones: sitk.Image | None = None) -> dict:
    """HU MAE (bone, soft tissue, body) and SSIM of ``pseudo_ct`` against ``ct`` under the true transform."""
    pct = sitk.GetArrayFromImage(sitk.Resample(pseudo_ct, ct, true_ct_to_mr, sitk.sitkLinear, np.nan,
                                               sitk.sitkFloat32))
    hu = sitk.GetArrayFromImage(ct)
    covered = np.isfinite(pct)
    bone = (sitk.GetArrayViewFromImage(ct_bones) > 0) if ct_bones is not None else hu > 200
    body = hu > -500
    soft = body & ~bone & (hu > -200) & (hu < 200)
    err = np.abs(np.nan_to_num(pct) - hu)

    def mae(m):
        m = m & covered
        return float(err[m].mean()) if m.any() else float("nan")

    idx = np.argwhere(body & covered)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    a = np.clip(np.where(covered, pct, -1000.0)[box], -1000, 2000)
    b = np.clip(np.where(covered, hu, -1000.0)[box], -1000, 2000)
    ssim = structural_similarity(a, b, data_range=3000.0, win_size=min(7, *[s - (1 - s % 2) for s in a.shape]))
    return {"mae_bone_hu": mae(bone), "mae_soft_hu": mae(soft), "mae_body_hu": mae(body), "ssim": float(ssim)}


def _read_mr(path: str, subject) -> sitk.Image:
    """The row's MR, refused when it is a CT in HU or a label image (their pseudo-CT would be scored as if valid)."""
    from ..registration.pipeline import check_mr_intensities

    mr = read_image(path, what=f"MR of {subject}")
    check_mr_intensities(mr, "the manifest's mr column must name the MR", f"MR of {subject}")
    return mr


def _true_transform(path: str, subject) -> sitk.Transform:
    from pathlib import Path

    from ..errors import InputImageError

    if not path or not Path(path).is_file():  # before ITK, whose HDF5 reader prints pages on a missing .h5
        raise InputImageError(f"subject {subject}: transform_ct_to_mr not found: {path or '(empty)'}")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise InputImageError(f"subject {subject}: transform_ct_to_mr {path} is not a readable ITK "
                              "transform file (the phantom's transform_ct_to_mr.h5)") from None


def evaluate_manifest(rows, model: SynthesisModel) -> dict:
    """Quality of ``model`` on manifest rows (needs the ``transform_ct_to_mr`` column: phantom only)."""
    from ..errors import UserError
    from .. import progress

    if "transform_ct_to_mr" not in rows.columns:
        raise UserError("the manifest has no transform_ct_to_mr column: synthesis quality needs the phantom's truth")
    per = {}
    for r in progress.track(rows.to_dict("records"), "synthesis: evaluate", total=len(rows), unit="pair"):
        ct = read_image(r["ct"], what="CT")
        check_ct_intensities(ct, what=f"CT of {r['subject']}")  # an MR in the ct column would be scored as the truth
        bones = read_bone_labels(r["ct_bones"], ct) if r.get("ct_bones") else None
        tx = _true_transform(r["transform_ct_to_mr"], r["subject"])
        per[r["subject"]] = quality(model.apply(_read_mr(r["mr"], r["subject"])), ct, tx, bones)
    keys = ("mae_bone_hu", "mae_soft_hu", "mae_body_hu", "ssim")
    summary = {k: float(np.nanmean([v[k] for v in per.values()])) for k in keys}
    summary["n"] = len(per)
    return {"summary": summary, "per_subject": per}
