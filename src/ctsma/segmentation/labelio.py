"""User segmentations in, Slicer-ready segmentations out.

* :func:`read_user_labels` reads a label image (NIfTI/NRRD/MHA) or a Slicer segmentation file (``.seg.nrrd``,
  one or several layers), maps segment names to CT-SMA label values (``femur``/``tibia``/... or
  ``MFC``/``LFC``/...), and resamples it (nearest neighbour) onto the CT grid, because Slicer crops
  segmentations to their extent.
* :func:`labels_from_segments` does the same for in-memory masks (what a Slicer module gets from a
  segmentation node with ``arrayFromSegmentBinaryLabelmap``).
* :func:`write_seg_nrrd` writes a label image as a ``.seg.nrrd`` Slicer opens as a segmentation with named,
  coloured segments (the header keys of Slicer's segmentation storage format).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .. import BONES, ROIS
from ..errors import InputImageError
from ..io.atomic import atomic_path
from ..io.images import check_image, read_image, same_grid

COLOURS = {"femur": (0.89, 0.85, 0.70), "tibia": (0.85, 0.70, 0.50), "patella": (0.70, 0.80, 0.90),
           "fibula": (0.60, 0.70, 0.55), "MFC": (0.90, 0.30, 0.25), "LFC": (0.25, 0.55, 0.90),
           "MTP": (0.95, 0.65, 0.20), "LTP": (0.30, 0.75, 0.45)}

_ALIASES = {"femur": ("femur", "femoral", "femur_left", "femur_right"), "tibia": ("tibia", "tibial"),
            "patella": ("patella",), "fibula": ("fibula",),
            "MFC": ("mfc", "medial femoral condyle", "medial_femoral_condyle"),
            "LFC": ("lfc", "lateral femoral condyle", "lateral_femoral_condyle"),
            "MTP": ("mtp", "medial tibial plateau", "medial_tibial_plateau"),
            "LTP": ("ltp", "lateral tibial plateau", "lateral_tibial_plateau")}


OTHER_TISSUES_FROM = 10
"""Label values from 10 up mark cartilage and other non-bone tissues (project label convention)."""


def _table(kind: str) -> dict[str, int]:
    if kind == "bones":
        return dict(BONES)
    if kind == "rois":
        return dict(ROIS)
    raise ValueError(f"kind must be 'bones' or 'rois', not {kind!r}")


def check_integer_labels(arr: np.ndarray, what: str) -> None:
    """Refuse label values that are not integers: a probability map or a label image resampled with linear
    interpolation, which a cast to labels would silently truncate (moving every edge)."""
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise InputImageError(f"{what} is not a label image (it has non-integer values)")


def value_for_name(name: str, kind: str) -> int | None:
    """CT-SMA label value for a segment name (case-insensitive, common aliases), or None."""
    key = re.sub(r"\s+", " ", name.strip().lower())
    for canon, value in _table(kind).items():
        if key == canon.lower() or key in _ALIASES.get(canon, ()):
            return value
    return None


def _resample_to(labels: sitk.Image, reference: sitk.Image, what: str = "label image") -> sitk.Image:
    if same_grid(reference, labels):
        out = sitk.Cast(labels, sitk.sitkUInt8)
        out.CopyInformation(reference)
        return out
    out = sitk.Resample(sitk.Cast(labels, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                        0, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(labels).any() and not sitk.GetArrayViewFromImage(out).any():
        raise InputImageError(f"{what} does not overlap the CT (its grid lies outside the CT's field of view); "
                              "give the segmentation made on this CT")
    warnings.warn(f"{what} is on a different grid than the CT; resampled onto the CT grid (nearest neighbour)",
                  stacklevel=3)
    return out


ROI_SLAB_DEPTH_MM = 5.0
"""Deepest point (mm from the label's surface) below which every label of a bone label image looks like a
subchondral ROI: the ROIs are bands 1-6 mm under the joint surface (measured 2.4-3.0 mm deep on the phantom's CT and
MR ROIs and on ``ctsma segment``'s), while the femur and tibia are 12-21 mm deep even in the MR's field of view."""
SIDE_BY_SIDE_MM = 15.0
"""Labels 1 and 2 whose centroids lie at least this far apart horizontally, and more than twice as far as
vertically, are side by side, as the MFC and LFC ROIs are (38 mm apart and within 1 mm in height on the phantom),
not a femur above a tibia (23-35 mm apart in height, within 2 mm horizontally)."""


_KIND_WORDS = {"rois": ("ROI", "ROIs"), "bones": ("bone", "bones")}
_ROI_VALUES = ", ".join(f"{k}={v}" for k, v in ROIS.items())     # MFC=1, LFC=2, MTP=3, LTP=4
_BONE_VALUES = ", ".join(f"{k}={v}" for k, v in BONES.items())   # femur=1, tibia=2, patella=3, fibula=4


def _recorded_as(path: Path, kind: str) -> str | None:
    """What wrote ``path`` as a ``kind`` image (``rois`` or ``bones``), by the record this project writes beside
    it, or None."""
    folder, name = path.parent, path.name
    other = "bones" if kind == "rois" else "rois"
    if name == f"{kind}.nii.gz":
        for record, command in (("segmentation.json", "ctsma segment"), ("summary.json", "ctsma infer")):
            if (folder / record).is_file():
                return (f"the {_KIND_WORDS[kind][0]} image written by '{command}' (its {record} is beside it; "
                        f"the {_KIND_WORDS[other][1]} are {other}.nii.gz)")
    try:
        meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and meta.get("generator") == "ctsma.phantom":
        row = meta.get("manifest_row") if isinstance(meta.get("manifest_row"), dict) else {}
        for key in (f"ct_{kind}", f"mr_{kind}"):
            if Path(str(row.get(key, ""))).name == name:
                return (f"the phantom's {key} (its metadata.json is beside it; the {_KIND_WORDS[other][1]} are "
                        f"{key.replace(kind, other)}.nii.gz)")
    return None


def _refuse_recorded(path: Path, kind: str, what: str) -> None:
    """Refuse ``path`` given as ``what`` when this project's record beside it says it holds ``kind`` labels."""
    recorded = _recorded_as(path, kind)
    if recorded:
        said = {"rois": f"subchondral ROIs ({_ROI_VALUES})", "bones": f"bone labels ({_BONE_VALUES})"}
        other = "bones" if kind == "rois" else "rois"
        raise InputImageError(f"{what} {path.name} is {recorded}: {said[kind]}, not {said[other]}; give the "
                              f"{_KIND_WORDS[other][0]} label image")


def label_offset(labels: sitk.Image) -> tuple[float, float] | None:
    """(horizontal distance, height of label 1 above label 2) in mm between the physical centroids of labels 1 and
    2, or None."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt8))
    if not {1, 2} <= set(stats.GetLabels()):
        return None
    d = np.subtract(stats.GetCentroid(1), stats.GetCentroid(2))
    return float(np.hypot(d[0], d[1])), float(d[2])  # LPS z is superior


def _apart(labels: sitk.Image) -> tuple[float, float] | None:
    """(horizontal, vertical) distance in mm between the physical centroids of labels 1 and 2, or None."""
    offset = label_offset(labels)
    return None if offset is None else (offset[0], abs(offset[1]))


def check_femur_above_tibia(path: Path, labels: sitk.Image, what: str = "bone segmentation") -> None:
    """Refuse bone labels whose label 1 (femur) lies below label 2 (tibia), one above the other
    (:data:`SIDE_BY_SIDE_MM`): femur and tibia swapped, or another tool's numbering. It ran, the tibial ROIs
    placed on the femur and the femoral ones empty, with a warning to check the ROI segmentation."""
    offset = label_offset(labels)
    if offset is not None and -offset[1] >= SIDE_BY_SIDE_MM and -offset[1] > 2 * offset[0]:
        raise InputImageError(f"{what} {path.name}: label 1 (femur) lies {-offset[1]:.0f} mm below label 2 (tibia); "
                              f"CT-SMA expects {_BONE_VALUES}, the femur above the tibia: are femur and tibia "
                              "swapped?")


BRIGHT_HU = 300.0
"""HU above which a voxel is taken for bone by :func:`bone_labels_mismatch` (cortex and dense trabecular bone)."""
BRIGHT_SHELL_LIMIT = 0.10
"""Largest share of bone-bright voxels in the 1-4 mm just outside a user's femur and tibia labels before the
segmentation is doubted: 1-3 % for the 36 demo phantom knees' own bone labels (patella and fibula nearby included),
11-35 % for the same labels mirrored left-right, but also 15-17 % for a knee's own labels drawn 1 mm inside the
bone's outer edge (the cortex then lies in the shell), which the warning names as a possible cause."""
MIN_CONTRAST_HU = 150.0
"""Least mean HU of the labelled femur and tibia above the 1-4 mm around them: 411-618 HU for the demo knees' own
labels; another knee's labels on a CT (36 pairs) lie partly off its bones, -251 to +171 HU, or are caught by the
bright shell (all 34 that overlapped the CT were caught by one rule or the other)."""


def bone_labels_mismatch(ct: sitk.Image, bones: sitk.Image) -> str | None:
    """A warning when ``bones`` (femur 1, tibia 2, on ``ct``'s grid, best a coarse copy) do not outline the CT's
    femur and tibia, as for another knee's or a left-right mirrored segmentation (analysed without a word before):
    bone-bright voxels (:data:`BRIGHT_HU`) fill more than :data:`BRIGHT_SHELL_LIMIT` of the shell 1-4 mm outside
    the labels, or the labels are less than :data:`MIN_CONTRAST_HU` brighter than that shell on average."""
    from .geometry import crop_box, edt_inside, spacing_zyx

    lab = sitk.GetArrayViewFromImage(bones)
    femur_tibia = (lab == BONES["femur"]) | (lab == BONES["tibia"])
    if not femur_tibia.any():
        return None
    sp = spacing_zyx(bones)
    box = crop_box(femur_tibia, np.ceil(5.0 / np.asarray(sp)).astype(int))
    outside = edt_inside(~femur_tibia[box], sp)  # distance to the labels, outside them
    shell = (outside > 1.0) & (outside <= 4.0)
    if not shell.any():
        return None
    hu = sitk.GetArrayViewFromImage(ct)[box]
    share = float((hu[shell] > BRIGHT_HU).mean())
    contrast = float(hu[femur_tibia[box]].mean() - hu[shell].mean())
    if share <= BRIGHT_SHELL_LIMIT and contrast >= MIN_CONTRAST_HU:
        return None
    return (f"the bone segmentation may not match this CT's femur and tibia: {share:.0%} of the 1-4 mm just outside "
            f"its femur and tibia is as bright as bone (> {BRIGHT_HU:.0f} HU), and the labelled bone is {contrast:.0f} "
            "HU brighter than that on average (a segmentation on this CT's bone edges: a few per cent, and several "
            "hundred HU), as for another knee's or a left-right mirrored segmentation, or one drawn inside the bone's "
            "outer edge (1 mm inside: 15-17 % on the phantom), which moves the subchondral ROIs with it; check it "
            "before using the results")


def check_not_rois(path: Path, labels: sitk.Image, what: str = "bone segmentation") -> None:
    """Refuse a subchondral ROI image (MFC=1, LFC=2, MTP=3, LTP=4) given as bone labels: its values are valid
    bone labels too. Refused when this project's record beside the file says it holds ROIs, or when every label is
    a thin slab (:data:`ROI_SLAB_DEPTH_MM`) and labels 1 and 2 lie side by side (:data:`SIDE_BY_SIDE_MM`), as the
    condyles' ROIs do, where a femur lies above a tibia; thin slabs alone (a bone image cropped to a few mm) only
    warn."""
    _refuse_recorded(path, "rois", what)
    arr = sitk.GetArrayViewFromImage(labels)
    if not arr.any():
        return
    from .geometry import crop_box, edt_inside, spacing_zyx
    box = crop_box(arr, 1)  # a voxel of background around the labels; the image's borders are not a surface
    sub = arr[box]
    depth = float(edt_inside(sub > 0, spacing_zyx(labels)).max())
    if depth > ROI_SLAB_DEPTH_MM:
        return
    message = (f"{what} {path.name} looks like a subchondral ROI image ({_ROI_VALUES}), not bone labels "
               f"({_BONE_VALUES}): every label lies within {depth:.1f} mm of its surface, a slab as thin as the ROIs")
    apart = _apart(labels)
    if apart is not None:
        across, up = apart
        if across >= SIDE_BY_SIDE_MM and across > 2 * up:
            raise InputImageError(f"{message}, and labels 1 and 2 lie side by side ({across:.0f} mm apart "
                                  f"horizontally, {up:.0f} mm in height) as the condyles' ROIs do, not a femur above "
                                  "a tibia; give the bone label image")
    warnings.warn(f"{message}; check that it is the bone label image", stacklevel=3)


def check_not_bones(path: Path, labels: sitk.Image, what: str = "ROI segmentation") -> None:
    """Refuse a bone label image (femur=1, tibia=2, patella=3, fibula=4) given as subchondral ROIs: its values are
    valid ROI labels too. Refused when this project's record beside the file says it holds bones, or when labels 1
    and 2 lie one above the other (a femur above a tibia: 23-35 mm in height, within 2 mm horizontally on the
    phantom), where the condyles' ROIs lie side by side at one height (:data:`SIDE_BY_SIDE_MM`)."""
    _refuse_recorded(path, "bones", what)
    apart = _apart(labels)  # None for an empty image
    if apart is not None:
        across, up = apart
        if up >= SIDE_BY_SIDE_MM and up > 2 * across:
            raise InputImageError(f"{what} {path.name} looks like a bone label image ({_BONE_VALUES}), not "
                                  f"subchondral ROIs ({_ROI_VALUES}): labels 1 and 2 lie one above the other "
                                  f"({up:.0f} mm apart in height, {across:.0f} mm horizontally), as a femur and a "
                                  "tibia do, where the condyles' ROIs lie side by side; give the ROI image")


def read_user_labels(path: str | os.PathLike, reference: sitk.Image, kind: str = "bones") -> sitk.Image:
    """Read a user label image or ``.seg.nrrd`` and return CT-SMA labels (UInt8) on ``reference``'s grid."""
    path = Path(path)
    table = _table(kind)
    what = "bone segmentation" if kind == "bones" else "ROI segmentation"
    if not path.exists():
        raise InputImageError(f"{what} not found: {path}")
    if path.name.lower().endswith(".seg.nrrd"):
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputImageError(f"cannot read {what} {path}: {str(exc).strip().splitlines()[-1][:200]}") from None
        meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
        layers = ([sitk.VectorIndexSelectionCast(img, i) for i in range(img.GetNumberOfComponentsPerPixel())]
                  if img.GetNumberOfComponentsPerPixel() > 1 else [img])
        out = np.zeros(sitk.GetArrayViewFromImage(layers[0]).shape, np.uint8)
        i, found, ignored = 0, [], []
        while f"Segment{i}_Name" in meta:
            name = meta[f"Segment{i}_Name"]
            value = int(meta.get(f"Segment{i}_LabelValue", i + 1))
            layer = int(meta.get(f"Segment{i}_Layer", 0))
            target = value_for_name(name, kind)
            if target is None:
                ignored.append(name)
            else:
                out[sitk.GetArrayViewFromImage(layers[layer]) == value] = target
                found.append(name)
            i += 1
        other = "rois" if kind == "bones" else "bones"
        if not found and ignored and all(value_for_name(n, other) for n in ignored):
            raise InputImageError(f"{what} {path.name} is a {'subchondral ROI' if other == 'rois' else 'bone'} "
                                  f"segmentation (segments {', '.join(ignored)}), not "
                                  f"{'bones' if kind == 'bones' else 'ROIs'} ({', '.join(table)}); give the "
                                  f"{'bone' if kind == 'bones' else 'ROI'} segmentation (e.g. {kind}.seg.nrrd)")
        for name in ignored:
            warnings.warn(f"{path.name}: segment {name!r} is not one of {', '.join(table)}; ignored", stacklevel=2)
        if not found:
            raise InputImageError(f"{what} {path.name} has no segment named {' / '.join(table)}; "
                                  "rename the segments in Slicer's Segment Editor")
        lab = sitk.GetImageFromArray(out)
        lab.CopyInformation(layers[0])
    else:
        _refuse_recorded(path, "rois" if kind == "bones" else "bones", what)  # before its values are judged
        lab = read_image(path, what=what, pixel_type=None)
        arr = sitk.GetArrayViewFromImage(lab)
        check_integer_labels(arr, f"{what} {path.name}")
        values = set(np.unique(arr).astype(int).tolist()) - {0}
        if kind == "bones" and any(v >= OTHER_TISSUES_FROM for v in values):
            # the label convention puts cartilage and other tissues at 10 and up: they are not bones
            keep = np.where(sitk.GetArrayFromImage(lab) >= OTHER_TISSUES_FROM, 0, sitk.GetArrayFromImage(lab))
            cleaned = sitk.GetImageFromArray(keep.astype(np.uint8))
            cleaned.CopyInformation(lab)
            lab = cleaned
            values = {v for v in values if v < OTHER_TISSUES_FROM}
        bad = sorted(values - set(table.values()))
        if bad:
            tissues = (" (10 and up are the other tissues of a bone label image)"
                       if kind == "rois" and max(bad) >= OTHER_TISSUES_FROM else "")
            raise InputImageError(f"{what} {path.name} has label value(s) {bad[:6]}{tissues}; CT-SMA expects "
                                  + ", ".join(f"{k}={v}" for k, v in table.items()))
        lab = sitk.Cast(lab, sitk.sitkUInt8)
        (check_not_rois if kind == "bones" else check_not_bones)(path, lab, what)
        if kind == "bones":
            check_femur_above_tibia(path, lab, what)
    return _resample_to(lab, reference, f"{what} {path.name}")


def labels_from_segments(masks: Mapping[str, np.ndarray], reference: sitk.Image, kind: str = "bones") -> sitk.Image:
    """Named boolean (z, y, x) masks on ``reference``'s grid -> a CT-SMA label image (unknown names refused)."""
    shape = sitk.GetArrayViewFromImage(reference).shape
    out = np.zeros(shape, np.uint8)
    for name, m in masks.items():
        v = value_for_name(name, kind)
        if v is None:
            raise InputImageError(f"segment {name!r} is not one of {', '.join(_table(kind))}")
        m = np.asarray(m)
        if m.shape != shape:
            raise InputImageError(f"segment {name!r} has shape {m.shape}, not the reference's {shape}")
        out[m.astype(bool)] = v
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(reference)
    return img


def write_seg_nrrd(labels: sitk.Image, path: str | os.PathLike, kind: str = "rois") -> Path:
    """Write ``labels`` as a Slicer segmentation file (``.seg.nrrd``), one named, coloured segment per label."""
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ValueError("a Slicer segmentation file name must end with .seg.nrrd")
    labels = check_image(labels, what="label image", pixel_type=sitk.sitkUInt8)
    arr = sitk.GetArrayViewFromImage(labels)
    img = sitk.Image(labels)
    for k in list(img.GetMetaDataKeys()):
        img.EraseMetaData(k)
    i = 0
    for name, value in _table(kind).items():
        zyx = np.argwhere(arr == value)
        if zyx.size:
            lo, hi = zyx.min(0)[::-1], zyx.max(0)[::-1]
            extent = " ".join(f"{a} {b}" for a, b in zip(lo, hi))
        else:
            extent = "0 -1 0 -1 0 -1"
        r, g, b = COLOURS[name]
        for key, val in (("ID", name), ("Name", name), ("NameAutoGenerated", "0"), ("Color", f"{r} {g} {b}"),
                         ("ColorAutoGenerated", "0"), ("LabelValue", str(value)), ("Layer", "0"),
                         ("Extent", extent), ("Tags", "|")):
            img.SetMetaData(f"Segment{i}_{key}", val)
        i += 1
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    img.SetMetaData("Segmentation_ConversionParameters", "")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return path
