"""Bone and body masks for registration: validated label input and a simple threshold fallback.

The per-bone stage needs femur (1) and tibia (2) labels in CT space. They come from the user
(``--ct-bones``: the phantom's ``ct_bones``, a manual or automatic segmentation). Without them,
:func:`threshold_bones` labels the two largest bright connected components (HU threshold, holes
filled), the superior one as femur: the method of the original code. It is a fallback, not a
segmentation: it cannot split bones that touch at the image resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import BONES
from ..errors import InputImageError
from ..io.images import check_same_geometry


def validate_bones(bones: sitk.Image, ref: sitk.Image, *, names=("femur", "tibia"), what="CT bone labels") -> sitk.Image:
    """Check that ``bones`` matches ``ref`` and holds a non-empty label for each of ``names``."""
    check_same_geometry(ref, bones, what_a="CT", what_b=what)
    bones = sitk.Cast(bones, sitk.sitkUInt8)
    counts = np.bincount(sitk.GetArrayViewFromImage(bones).ravel(), minlength=max(BONES.values()) + 1)
    missing = [n for n in names if counts[BONES[n]] == 0]
    if missing:
        raise InputImageError(f"{what} have no voxels for {', '.join(missing)} "
                              f"(labels {', '.join(f'{n}={BONES[n]}' for n in missing)}); "
                              "give a bone segmentation with these labels, or leave it out to use the threshold fallback")
    return bones


def read_bone_labels(path, ct: sitk.Image, *, what: str = "CT bone labels") -> sitk.Image:
    """Bone labels for ``ct`` (the MR when ``what`` starts with "MR") from a file: a ``.seg.nrrd`` through ``ctsma.segmentation``, or a label image
    whose values 1-4 are bones (values from 10 up, cartilage and other tissues, are ignored)."""
    from ..io.images import read_image
    from ..segmentation.labelio import check_integer_labels

    if str(path).lower().endswith(".seg.nrrd"):
        from ..segmentation import read_user_labels
        return read_user_labels(path, ct, kind="bones")
    img = read_image(path, what=what, pixel_type=None)
    check_same_geometry(ct, img, what_a="MR" if what.startswith("MR") else "CT", what_b=what)
    arr = sitk.GetArrayFromImage(img)
    check_integer_labels(arr, f"{what} {Path(path).name}")
    arr = np.where((arr < 0) | (arr > max(BONES.values())), 0, arr).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    _check_bone_order(out, f"{what} {Path(path).name}")
    return out


FEMUR_ABOVE_TIBIA_MM = 10.0
"""How far the femur's centroid must lie above the tibia's (LPS +z is superior) in given bone labels. The two lie
some centimetres apart (the phantom's: 34-35 mm); a subchondral ROI image, whose labels take the same values (MFC=1,
LFC=2), has them side by side, their centroids within 5 mm in height."""


def _check_bone_order(labels: sitk.Image, what: str) -> None:
    """Refuse femur/tibia labels whose femur does not lie above the tibia: most likely the ROI image."""
    from ..segmentation.labelio import label_offset

    offset = label_offset(labels)  # None without both: validate_bones names a missing bone
    if offset is not None and offset[1] < FEMUR_ABOVE_TIBIA_MM:
        raise InputImageError(
            f"{what}: the femur (label 1) does not lie above the tibia (label 2) (their centroids "
            f"{offset[1]:+.1f} mm apart in height); is this the subchondral ROI image (rois.nii.gz: "
            "MFC=1 and LFC=2 side by side) rather than the bones (bones.nii.gz), are the labels swapped, or is the "
            "image upside down in its header (its direction's z reversed)?")


def threshold_bones(img: sitk.Image, *, threshold_hu: float = 200.0, what: str = "CT") -> sitk.Image:
    """Femur=1 / tibia=2 labels from a CT or pseudo-CT by threshold + two largest components."""
    bright = sitk.BinaryThreshold(img, threshold_hu, 1e9, 1, 0)
    bright = sitk.BinaryFillhole(bright)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(bright), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    labels = [lab for lab in stats.GetLabels() if lab <= 2]
    min_vox = 200
    if len(labels) < 2 or stats.GetNumberOfPixels(2) < min_vox:
        raise InputImageError(f"could not find two bones in the {what} by thresholding at {threshold_hu:g} HU "
                              "(are femur and tibia both in the field of view?); give a bone segmentation instead")
    by_z = sorted(labels, key=lambda lab: stats.GetCentroid(lab)[2], reverse=True)  # LPS: +z is superior
    arr = sitk.GetArrayFromImage(cc)
    out = np.zeros(arr.shape, np.uint8)
    out[arr == by_z[0]] = BONES["femur"]
    out[arr == by_z[1]] = BONES["tibia"]
    res = sitk.GetImageFromArray(out)
    res.CopyInformation(img)
    return res


def body_mask(img: sitk.Image, *, is_ct: bool) -> sitk.Image:
    """Everything that is not air: CT above -500 HU; MR above a quarter of its 99th percentile, holes filled.

    Computed on a grid of about 1.5 mm (enough for a centroid, and fast).
    """
    f = [max(1, int(round(1.5 / s))) for s in img.GetSpacing()]
    if max(f) > 1:
        img = sitk.BinShrink(img, f)
    if is_ct:
        m = sitk.BinaryThreshold(img, -500.0, 1e9, 1, 0)
    else:
        arr = sitk.GetArrayViewFromImage(img)
        thr = 0.25 * float(np.percentile(arr[::3, ::3, ::3], 99))
        m = sitk.BinaryThreshold(img, thr, 1e12, 1, 0)
        m = sitk.BinaryMorphologicalClosing(m, [2, 2, 2])
    m = sitk.BinaryFillhole(m)
    if not np.any(sitk.GetArrayViewFromImage(m)):
        raise InputImageError("the image is empty (no voxel above the background level)")
    return m


def dilate_mm(mask: sitk.Image, mm: float) -> sitk.Image:
    """Binary mask grown by ``mm`` millimetres (Euclidean, physical units)."""
    mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
    if mm <= 0:
        return mask
    dist = sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.Cast(dist <= mm, sitk.sitkUInt8)


def label_mask(bones: sitk.Image, names) -> sitk.Image:
    """Union of the named bones as a 0/1 mask."""
    arr = sitk.GetArrayViewFromImage(bones)
    m = np.isin(arr, [BONES[n] for n in names]).astype(np.uint8)
    out = sitk.GetImageFromArray(m)
    out.CopyInformation(bones)
    return out


def centroid(mask: sitk.Image) -> np.ndarray:
    """Physical centroid (LPS mm) of the non-zero voxels of ``mask``."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if 1 not in stats.GetLabels():
        raise InputImageError("a mask used for initialisation is empty")
    return np.asarray(stats.GetCentroid(1))


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of two binary masks on the same grid (NaN when both are empty)."""
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    s = int(x.sum()) + int(y.sum())
    return float(2 * np.logical_and(x, y).sum() / s) if s else float("nan")
