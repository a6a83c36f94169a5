"""Automatic femur / tibia / patella / fibula labels from clinical knee CT.

The method is classical and deterministic (no trained model):

1. **Threshold** the CT at ``threshold_hu`` (cortex and dense trabecular bone), then **fill** enclosed marrow:
   slice by slice in the axial plane (so shafts cut open by the field of view are filled too) and in 3D.
2. **Markers**: connected components of the bone mask eroded by ``r`` mm (a threshold of the inside distance
   map, so erosion is exact and cheap). Where femur and tibia touch across a narrowed joint, one component
   spans both; it is split by eroding deeper (``r`` grows up to ``split_max_mm``) until it falls apart into an
   upper and a lower part.
3. **Anatomy**: the femur/tibia pair is the pair of large markers stacked vertically (physical LPS +z is
   superior), with a joint gap between them; the patella is the largest remaining marker anterior (-y) to the
   femur near the joint; the fibula the largest remaining one below the joint beside the tibia.
4. **Separation**: a marker-controlled watershed on the negated distance map floods the whole bone mask from
   those four markers, so touching bones are cut at their narrowest neck (the contact across the joint), and
   erosion fragments rejoin their bone.

Hand-written rather than taken from a library because no maintained package segments knee bones from CT
without a trained network; the steps are standard SimpleITK / scipy operations.

If no femur/tibia pair is found (for instance a hip or abdomen CT), :class:`NoKneeFoundError` says so in one
line, with what was found instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from .. import BONES
from ..config import setting
from ..errors import InputImageError
from ..io.images import check_image
from ..io.tables import side_letter
from .geometry import axial_axis, crop_box, edt_inside, fill_holes, index_to_lps, like, spacing_zyx


class NoKneeFoundError(InputImageError):
    """The CT does not show a knee joint (no femur above a tibia)."""


@dataclass
class BoneSegmentationSettings:
    threshold_hu: float = setting(250.0, lo=50.0, hi=1500.0, help="bone threshold (HU) that closes the cortex")
    edge_hu: float = setting(0.0, lo=0.0, hi=3000.0,
                             help="bone surface threshold (HU); 0: half-way between soft tissue and cortex")
    min_marker_ml: float = setting(0.2, lo=0.0, hi=100.0, help="smallest eroded bone part kept as a marker (mL)")
    erosion_mm: float = setting(2.5, lo=0.0, hi=10.0, help="initial marker erosion depth (mm)")
    split_max_mm: float = setting(10.0, lo=0.5, hi=30.0, help="deepest erosion tried to split femur from tibia (mm)")
    max_knee_width_mm: float = setting(140.0, lo=40.0, hi=400.0,
                                       help="a femur or tibia wider than this (left-right) is not a knee bone")
    max_joint_gap_mm: float = setting(30.0, lo=2.0, hi=100.0, help="largest femur-tibia marker gap at the joint")


@dataclass
class _Part:
    label: int
    voxels: int
    ml: float
    centroid: np.ndarray     # LPS mm
    z_lo: float              # LPS z range (mm)
    z_hi: float
    width_x: float           # LPS x extent (mm)


def _fill(mask: np.ndarray, axial: int) -> np.ndarray:
    st2 = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[axial] = 1
    st2[tuple(idx)] = ndi.generate_binary_structure(2, 1)
    return fill_holes(fill_holes(mask, st2))


def bone_mask(ct: np.ndarray, threshold_hu: float, axial: int = 0, spacing=(1.0, 1.0, 1.0),
              edge_hu: float | None = None, return_edge: bool = False):
    """Thresholded bone with enclosed marrow filled (axial slices, then 3D), surface at the half-maximum.

    ``threshold_hu`` finds bone and closes its cortical shell; the marrow inside is filled. The surface is then
    refined: within 1.5 mm of it, a voxel stays bone only above ``edge_hu``, by default half-way between the
    soft tissue just outside the bone (median) and the cortex just inside (90th percentile): the half-maximum
    of the blurred cortical edge, where a partial-volume boundary lies (a low threshold puts it too far out).
    """
    low = _fill(ct > threshold_hu, axial)
    if not low.any():
        return (low, float("nan")) if return_edge else low
    depth = edt_inside(low, spacing)
    if edge_hu is None:
        shell = low & (depth <= 1.0 * max(spacing))
        ring = ndi.binary_dilation(low, iterations=2) & ~low
        soft = float(np.median(ct[ring])) if ring.any() else -100.0
        cortex = float(np.percentile(ct[shell], 90)) if shell.any() else threshold_hu
        edge_hu = max(threshold_hu, 0.5 * (soft + cortex))
    mask = low & ((ct > edge_hu) | (depth > 1.5))
    mask = _fill(mask, axial)
    return (mask, float(edge_hu)) if return_edge else mask


def _parts(labels: np.ndarray, n: int, img: sitk.Image, voxel_ml: float, min_ml: float) -> list[_Part]:
    if n == 0:
        return []
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    objs = ndi.find_objects(labels)
    out = []
    for lab in range(1, n + 1):
        ml = counts[lab] * voxel_ml
        if ml < min_ml or objs[lab - 1] is None:
            continue
        sl = objs[lab - 1]
        zyx = np.argwhere(labels[sl] == lab)
        step = max(1, len(zyx) // 20000)
        zyx = zyx[::step] + np.array([s.start for s in sl])
        pts = index_to_lps(img, zyx)
        out.append(_Part(lab, int(counts[lab]), ml, pts.mean(0), float(pts[:, 2].min()), float(pts[:, 2].max()),
                         float(np.ptp(pts[:, 0]))))
    return out


def _stacked_pair(parts: list[_Part], s: BoneSegmentationSettings) -> tuple[_Part, _Part] | None:
    """The largest (upper, lower) pair of big parts that look like femur above tibia."""
    if len(parts) < 2:
        return None
    big = sorted(parts, key=lambda p: -p.ml)
    big = [p for p in big if p.ml >= 0.1 * big[0].ml][:6]
    best, best_ml = None, 0.0
    for a in big:
        for b in big:
            if a is b or a.centroid[2] <= b.centroid[2]:
                continue
            horiz = np.hypot(*(a.centroid[:2] - b.centroid[:2]))
            gap = a.z_lo - b.z_hi
            if (horiz < 60.0 and -0.5 * s.max_joint_gap_mm < gap < s.max_joint_gap_mm
                    and max(a.width_x, b.width_x) < s.max_knee_width_mm and a.ml + b.ml > best_ml):
                best, best_ml = (a, b), a.ml + b.ml
    return best


BOTH_KNEES_MM = 100.0  # femur centroids this far apart in x (LPS) are two knees, not one


class BothKneesError(InputImageError):
    """The CT shows both knees and no side was given to choose one."""


def _one_knee(parts: list[_Part], side: str | None, max_width_mm: float = 140.0) -> list[_Part]:
    """The parts of one knee. A CT of both knees has knee-sized parts (narrower than ``max_width_mm``, a tenth of the
    largest or more) more than :data:`BOTH_KNEES_MM` apart in x, whether or not a knee's femur and tibia touch; it
    keeps the parts on ``side`` (the patient's left knee lies at +x in LPS), and without a side it is refused
    rather than one chosen silently. A pelvis (wider) is not taken for two knees."""
    if not parts:
        return parts
    ref = max(parts, key=lambda p: p.ml)
    far = [p for p in parts if p.ml >= 0.1 * ref.ml and abs(p.centroid[0] - ref.centroid[0]) > BOTH_KNEES_MM
           and p.width_x < max_width_mm]
    if not far or ref.width_x >= max_width_mm:
        return parts
    mid = 0.5 * (ref.centroid[0] + float(np.mean([p.centroid[0] for p in far])))
    side = side_letter(side)
    if side is None:
        xs = sorted((ref.centroid[0], float(np.mean([p.centroid[0] for p in far]))))
        raise BothKneesError(f"the CT shows both knees (bones at x = {xs[0]:.0f} and {xs[1]:.0f} mm); give the "
                             "knee to analyse with --side R or L (the patient's right knee lies at -x, on the "
                             "image's left in radiological display), or crop the CT to one knee")
    left = side == "L"
    return [p for p in parts if (p.centroid[0] > mid) == left]


def _choose_knee(parts: list[_Part], s: BoneSegmentationSettings, side: str | None) -> tuple[_Part, _Part] | None:
    """:func:`_stacked_pair` of one knee's parts (:func:`_one_knee`)."""
    return _stacked_pair(_one_knee(parts, side, s.max_knee_width_mm), s)


def _describe(parts: list[_Part]) -> str:
    if not parts:
        return "no bone above the threshold"
    big = sorted(parts, key=lambda p: -p.ml)[:3]
    return "largest bone structures: " + "; ".join(
        f"{p.ml:.0f} mL, {p.width_x:.0f} mm wide, z {p.z_lo:.0f}..{p.z_hi:.0f} mm" for p in big)


def _split(markers: np.ndarray, dist: np.ndarray, label: int, r0: float, s: BoneSegmentationSettings,
           img: sitk.Image, voxel_ml: float, accept) -> bool:
    """Erode marker ``label`` deeper (r0*1.3^k up to ``split_max_mm``) until ``accept(pieces)`` is true.

    On success the marker is replaced in place by its pieces (new labels) and True is returned.
    """
    sl = ndi.find_objects((markers == label).astype(np.uint8))
    if not sl or sl[0] is None:
        return False
    sl = sl[0]
    region = markers[sl] == label
    r = max(r0, 0.5) * 1.3
    while r <= s.split_max_mm:
        sub, m = ndi.label(region & (dist[sl] > r))
        if m >= 2:
            # the pieces' descriptions need full-image coordinates: label them in a full-size view
            full = np.zeros(markers.shape, np.int32)
            full[sl] = sub
            pieces = _parts(full, m, img, voxel_ml, s.min_marker_ml)
            if len(pieces) >= 2 and accept(pieces):
                # grow the deep pieces back over the whole marker (watershed on the distance map), so a
                # smaller bone hidden in the marker (it vanished at depth r) stays inside its neighbour's piece
                # and can be split off from there
                grown = watershed(-dist[sl], markers=sub, mask=region)
                view = markers[sl]
                offset = int(markers.max())
                view[region] = grown[region] + offset
                return True
        r *= 1.3
    return False


def find_markers(mask: np.ndarray, img: sitk.Image, s: BoneSegmentationSettings, side: str | None = None):
    """Eroded-bone markers, with touching bones split by deeper erosion.

    Femur and tibia touching across a narrowed joint make one marker; it is eroded deeper until it falls
    apart into an upper and a lower bone. The same is tried on the femur (for a touching patella) and the
    tibia (for a touching fibula) when those were not found. A CT of both knees takes the knee on ``side``.
    Returns ``(marker_labels, parts, bones: dict name -> _Part or None, dist)``.
    """
    sp = spacing_zyx(img)
    voxel_ml = float(np.prod(sp)) / 1000.0
    dist = edt_inside(mask, sp)
    markers, n = ndi.label(dist > s.erosion_mm)
    markers = markers.astype(np.int32)
    parts = _parts(markers, n, img, voxel_ml, s.min_marker_ml)
    pair = _choose_knee(parts, s, side)
    if pair is None:
        # only a knee-sized structure can be a femur and tibia stuck together (a pelvis is far wider)
        one = _one_knee(parts, side, s.max_knee_width_mm)
        cands = [p for p in sorted(one, key=lambda p: -p.ml)[:2] if p.width_x < s.max_knee_width_mm]
        for cand in cands:
            if _split(markers, dist, cand.label, s.erosion_mm, s, img, voxel_ml,
                      lambda pieces: _stacked_pair(pieces, s) is not None):
                parts = _parts(markers, int(markers.max()), img, voxel_ml, s.min_marker_ml)
                pair = _choose_knee(parts, s, side)
                break
    if pair is None:
        return markers, parts, None, dist
    bones = _classify(parts, pair)
    for host, small in (("femur", "patella"), ("tibia", "fibula")):
        if small in bones:
            continue

        def accept(pieces, host=host, small=small):
            others = [p for p in parts if p.label != bones[host].label]
            big = max(pieces, key=lambda p: p.ml)
            trial = dict(bones)
            trial[host] = big
            pr = (trial["femur"], trial["tibia"])
            return small in _classify(others + pieces, pr)

        if _split(markers, dist, bones[host].label, s.erosion_mm, s, img, voxel_ml, accept):
            parts = _parts(markers, int(markers.max()), img, voxel_ml, s.min_marker_ml)
            pair = _choose_knee(parts, s, side)
            if pair is None:  # cannot happen in practice: the host's largest piece keeps its place
                return markers, parts, None, dist
            bones = _classify(parts, pair)
    return markers, parts, bones, dist


def _classify(parts: list[_Part], pair: tuple[_Part, _Part]) -> dict[str, _Part]:
    femur, tibia = pair
    joint_z = 0.5 * (femur.z_lo + tibia.z_hi)
    out = {"femur": femur, "tibia": tibia}
    rest = [p for p in parts if p is not femur and p is not tibia]
    # patella: anterior (LPS -y) of the femur, above the joint line, much smaller than the femur
    pat = [p for p in rest
           if 10.0 < femur.centroid[1] - p.centroid[1] < 80.0          # anterior of the femur
           and joint_z - 10.0 < p.centroid[2] < joint_z + 90.0          # at or above the joint line
           and abs(p.centroid[0] - femur.centroid[0]) < 40.0
           and 0.5 < p.ml < femur.ml]
    if pat:
        out["patella"] = max(pat, key=lambda p: p.ml)
    # fibula: below the joint, beside the tibia (lateral and usually posterior), much smaller than the tibia
    fib = [p for p in rest if p.centroid[2] < joint_z - 5.0 and p.ml < tibia.ml
           and 12.0 < abs(p.centroid[0] - tibia.centroid[0]) < 70.0
           and np.hypot(*(p.centroid[:2] - tibia.centroid[:2])) < 80.0 and p is not out.get("patella")]
    if fib:
        out["fibula"] = max(fib, key=lambda p: p.ml)
    return out


BOX_MARGIN_VOXELS = 4  # air kept around the bone's bounding box: more than any neighbourhood the steps look at


def segment_bones(ct_image: sitk.Image, settings: BoneSegmentationSettings | None = None, *,
                  return_info: bool = False, side: str | None = None):
    """Label femur=1, tibia=2, patella=3, fibula=4 on a knee CT (HU); returns a UInt8 image in the CT's geometry.

    Raises :class:`NoKneeFoundError` when the image shows no femur above a tibia, and :class:`BothKneesError`
    when it shows both knees and ``side`` ("L"/"R", the knee to label) is not given. With ``return_info`` also
    returns a dict (bones found with volumes in mL, joint height, erosion used).

    The work is done on the bounding box of the voxels above ``threshold_hu`` grown by
    :data:`BOX_MARGIN_VOXELS` (a clinical knee CT is mostly air and soft tissue): every step gives there what it
    gives on the whole CT, because nothing outside the box is bone and the margin is wider than the
    neighbourhoods they look at (the suite checks the labels are the same).
    """
    s = settings or BoneSegmentationSettings()
    ct_image = check_image(ct_image, what="CT", pixel_type=sitk.sitkFloat32)
    box = _bone_box(sitk.GetArrayViewFromImage(ct_image), s.threshold_hu)
    sub = ct_image if box is None else ct_image[box[2], box[1], box[0]]  # SimpleITK slices are (x, y, z)
    lab, bones, edge = _segment(sub, s, side)
    if box is not None:
        full = np.zeros(sitk.GetArrayViewFromImage(ct_image).shape, np.uint8)
        full[box] = lab
        lab = full
    result = like(lab, ct_image)
    if not return_info:
        return result
    voxel_ml = float(np.prod(ct_image.GetSpacing())) / 1000.0
    info = {"bones": {k: float((lab == BONES[k]).sum() * voxel_ml) for k in bones},
            "joint_z_mm": 0.5 * (bones["femur"].z_lo + bones["tibia"].z_hi), "threshold_hu": s.threshold_hu,
            "edge_hu": edge}
    return result, info


def _bone_box(ct: np.ndarray, threshold_hu: float) -> tuple[slice, slice, slice] | None:
    """(z, y, x) slices of the voxels above ``threshold_hu`` grown by :data:`BOX_MARGIN_VOXELS`, or None when
    that is the whole image or there is no such voxel (the whole image is then segmented, and says why not)."""
    hot = ct > threshold_hu
    if not hot.any():
        return None
    box = crop_box(hot, BOX_MARGIN_VOXELS)
    if all(b.start == 0 and b.stop == n for b, n in zip(box, ct.shape)):
        return None
    return box  # type: ignore[return-value]


def _segment(ct_image: sitk.Image, s: BoneSegmentationSettings, side: str | None):
    """:func:`segment_bones` on the image as it is: (uint8 (z, y, x) labels, bones found, edge threshold)."""
    ct = sitk.GetArrayViewFromImage(ct_image)
    mask, edge = bone_mask(ct, s.threshold_hu, axial_axis(ct_image), spacing_zyx(ct_image),
                           s.edge_hu if s.edge_hu > 0 else None, return_edge=True)
    markers, parts, bones, dist = find_markers(mask, ct_image, s, side)
    if bones is None:
        raise NoKneeFoundError(f"no knee joint found in the CT (no femur above a tibia); {_describe(parts)}. "
                               "Is this a knee CT? A bone label image given instead of the automatic segmentation "
                               "overrides this (ctsma infer --segmentation, ctsma register --ct-bones, "
                               "ctsma segment --bones)")
    seeds = np.zeros(markers.shape, np.uint8)
    for name, p in bones.items():
        seeds[markers == p.label] = BONES[name]
    ws = sitk.MorphologicalWatershedFromMarkers(like(-dist, ct_image, np.float32), like(seeds, ct_image),
                                                markWatershedLine=False, fullyConnected=False)
    lab = sitk.GetArrayFromImage(ws).astype(np.uint8)
    lab[~mask] = 0
    # keep, per bone, only the part connected to its marker (watershed can leak into unrelated structures
    # that touch nothing but are nearest to a basin: those are not reached, but small islands can remain)
    out = np.zeros_like(lab)
    for name, p in bones.items():
        v = BONES[name]
        cc, n = ndi.label(lab == v)
        if n:
            keep = np.unique(cc[(seeds == v) & (cc > 0)])
            out[np.isin(cc, keep[keep > 0])] = v
    return out, bones, edge
