"""Subchondral ROIs: medial/lateral femoral condyle and tibial plateau (MFC=1, LFC=2, MTP=3, LTP=4).

Definition (see docs/segmentation.md and its figure):

* The **load-bearing surface** of the femur is the part of its surface within ``contact_mm`` of the tibia, and
  that of the tibia the part within ``contact_mm`` of the femur (the tibiofemoral compartments; the
  patellofemoral groove and the bone shafts are excluded).
* Each ROI is a **band under that surface**: bone voxels whose depth below the bone surface lies in
  ``[start_mm, end_mm]`` and whose nearest surface point is on the load-bearing surface. Depth is the exact
  Euclidean distance to the nearest non-bone voxel (so the subchondral plate, the first ~1-2 mm, is skipped by
  choosing ``start_mm``).
* **Medial / lateral** are split by a sagittal plane (constant LPS x) through the intercondylar notch, found as
  the emptiest x position between the two condyles' contact areas. Which side is medial follows the knee's
  laterality: from ``side`` (metadata, ``L``/``R``) when given, else from anatomy (the fibula is lateral to the
  tibia). For a right knee medial is +x in LPS (towards the patient's left), for a left knee -x.

Hand-written (distance transforms from scipy/edt) because no library defines subchondral knee ROIs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .. import BONES, ROIS
from ..config import setting
from ..errors import InputImageError, UserError
from ..io.images import check_image, check_same_geometry
from .geometry import axial_axis, index_to_lps, like, spacing_zyx


@dataclass
class RoiSettings:
    start_mm: float = setting(1.0, lo=0.0, hi=30.0, help="ROI band start depth below the bone surface (mm)")
    end_mm: float = setting(6.0, lo=0.5, hi=40.0, help="ROI band end depth below the bone surface (mm)")
    contact_mm: float = setting(12.0, lo=1.0, hi=40.0,
                                help="largest joint gap (mm) searched for the femur-tibia contact")
    tibial_footprint: str = setting("plateau", choices=("contact", "plateau"),
                                    help="tibial ROI footprint: under the femoral contact, or the central "
                                         "region of each hemi-plateau (the phantom's definition)")
    femoral_footprint: str = setting("box", choices=("contact", "box"),
                                     help="femoral footprint: the contact ellipse, or its bounding box narrowed "
                                          "antero-posteriorly (the phantom's box-shaped condyle ROIs)")
    box_ap_fraction: float = setting(0.71, lo=0.1, hi=1.0, help="AP narrowing of the femoral box footprint")
    contact_margin_mm: float = setting(6.0, lo=0.1, hi=40.0,
                                       help="load-bearing surface: joint gap within this of the compartment's "
                                            "narrowest gap (mm)")


class LateralityError(UserError):
    """The knee's side could not be told from metadata or anatomy."""


def knee_side(bones: np.ndarray, img: sitk.Image) -> str | None:
    """``'R'`` or ``'L'`` from anatomy (the fibula lies lateral to the tibia), or ``None`` without a fibula."""
    fib = bones == BONES["fibula"]
    tib = bones == BONES["tibia"]
    if fib.sum() < 50 or tib.sum() < 50:
        return None
    fx = index_to_lps(img, np.argwhere(fib)[:: max(1, int(fib.sum()) // 5000)])[:, 0].mean()
    tx = index_to_lps(img, np.argwhere(tib)[:: max(1, int(tib.sum()) // 5000)])[:, 0].mean()
    # LPS +x is the patient's left; a fibula at lower x than the tibia is on the patient's right: lateral of a
    # right knee.
    return "R" if fx < tx else "L"


def _notch_x(xs: np.ndarray) -> float:
    """x (mm) of the emptiest 1-mm bin between the two condyles' contact areas (central 60 % of their span)."""
    lo, hi = np.percentile(xs, [2, 98])
    if hi - lo < 4:
        return float(np.median(xs))
    edges = np.arange(lo, hi + 1.0, 1.0)
    h, _ = np.histogram(xs, edges)
    h = ndi.uniform_filter1d(h.astype(float), 3)
    n = len(h)
    a, b = int(0.2 * n), max(int(0.8 * n), int(0.2 * n) + 1)
    seg = h[a:b]
    low = seg <= seg.min() + 0.05 * (h.max() - seg.min())   # the valley floor, as a run of bins
    i = int(np.argmin(seg))
    j, k = i, i
    while j > 0 and low[j - 1]:
        j -= 1
    while k < len(seg) - 1 and low[k + 1]:
        k += 1
    return float(0.5 * (edges[a + j] + edges[a + k + 1]))


def _band(own: np.ndarray, other: np.ndarray, sp, s: RoiSettings) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of ``own`` in the depth band, and the joint gap (mm) at each one's nearest surface point.

    The gap is the distance from the nearest outside voxel (the surface point) to ``other``; voxels whose gap
    exceeds ``contact_mm`` are dropped.
    """
    depth, idx = ndi.distance_transform_edt(own, sampling=sp, return_indices=True)
    gap_field = ndi.distance_transform_edt(~other, sampling=sp)
    # the surface lies half a voxel step before the nearest outside voxel centre: subtract that step, taken
    # along the direction to it (0.5 * slice thickness under a plateau imaged in axial slices)
    cand = own & (depth > 0)
    pos = np.nonzero(cand)
    vec = np.stack([(idx[k][cand] - pos[k]) * sp[k] for k in range(3)])
    norm = np.maximum(np.linalg.norm(vec, axis=0), 1e-9)
    half = 0.5 * np.sum(np.abs(vec) / norm * np.asarray(sp)[:, None], axis=0) / np.maximum(
        np.sum(np.abs(vec) / norm, axis=0), 1e-9)
    depth = depth.astype(np.float32)
    depth[cand] -= half
    band = own & (depth >= s.start_mm) & (depth <= s.end_mm)
    gap = np.full(own.shape, np.inf, np.float32)
    gap[band] = gap_field[idx[0][band], idx[1][band], idx[2][band]]
    band &= gap <= s.contact_mm
    return band, gap


def _footprints(f: np.ndarray, t: np.ndarray, ref: sitk.Image, box, medial: np.ndarray, sp, s: RoiSettings):
    """Load-bearing footprints, as (z, y, x) masks of whole columns along the superior-inferior axis.

    For every column through both bones, the vertical joint gap is the distance from the femur's lowest voxel to
    the tibia's highest one below it. In each compartment (medial, lateral) the footprint is where that gap is
    within ``contact_margin_mm`` of its narrowest value: the contact area under load (for a condyle of radii
    a, b the area where its height above the lowest point is below the margin).
    """
    ax = axial_axis(ref)
    d = np.asarray(ref.GetDirection(), float).reshape(3, 3)
    up = np.sign(d[2, 2 - ax]) or 1.0            # +1 if the index along ``ax`` grows towards superior
    fa, ta, ma = (np.moveaxis(v, ax, 0) for v in (f, t, medial))
    if up < 0:
        fa, ta, ma = fa[::-1], ta[::-1], ma[::-1]
    n = fa.shape[0]
    has_f, has_t = fa.any(0), ta.any(0)
    f_low = np.where(has_f, np.argmax(fa, 0), n)                       # first femur voxel from below
    t_high = np.where(has_t, n - 1 - np.argmax(ta[::-1], 0), -1)      # last tibia voxel from below
    ok = has_f & has_t & (f_low > t_high)
    gap = np.where(ok, (f_low - t_high - 1) * sp[ax], np.inf)
    col_medial = np.take_along_axis(ma, np.clip(f_low, 0, n - 1)[None], 0)[0]
    foot = np.zeros(gap.shape, bool)
    gaps = {}
    for name, side in (("medial", col_medial), ("lateral", ~col_medial)):
        g = gap[ok & side]
        if g.size:
            gaps[name] = float(g.min())
            contact = ok & side & (gap <= g.min() + s.contact_margin_mm)
            if s.femoral_footprint == "box" and contact.sum() > 4:
                # the contact ellipse's bounding box, narrowed antero-posteriorly to ``box_ap_fraction``
                rows, cols_ = np.nonzero(contact)
                lo = np.array([rows.min(), cols_.min()], float)
                hi = np.array([rows.max(), cols_.max()], float)
                c, h = 0.5 * (lo + hi), 0.5 * (hi - lo) + 0.5
                h[_ap_axis(ref, ax)] *= s.box_ap_fraction
                rr, cc = np.indices(contact.shape)
                contact = ok & side & (np.abs(rr - c[0]) <= h[0]) & (np.abs(cc - c[1]) <= h[1])
            foot |= contact

    def to_volume(cols):
        v = np.broadcast_to(cols[None], fa.shape)
        if up < 0:
            v = v[::-1]
        return np.moveaxis(v, 0, ax)

    foot_t = foot
    if s.tibial_footprint == "plateau":
        foot_t = _plateau_footprint(ta, t_high, has_t, ref, box, ax, up, sp)
    return to_volume(foot), to_volume(foot_t), gaps


def _ap_axis(ref: sitk.Image, ax: int) -> int:
    """Which of the two in-plane axes (after moving the axial axis first) is closest to LPS y (anterior-posterior)."""
    d = np.asarray(ref.GetDirection(), float).reshape(3, 3)
    others = [k for k in (0, 1, 2) if k != ax]                # numpy axes, in order
    return int(np.argmax([abs(d[1, 2 - k]) for k in others]))


def _plateau_footprint(ta, t_high, has_t, ref, box, ax, up, sp) -> np.ndarray:
    """Columns of the central region of each hemi-plateau: an ellipse centred at +-0.51 of the plateau's
    half-width from its centre, with semi-axes 0.27 x half-width and 0.6 x half-depth (the digital phantom's
    definition, which scales with the imaged plateau)."""
    n = ta.shape[0]
    top = t_high.max()
    plateau = has_t & (t_high >= top - int(np.ceil(12.0 / sp[ax])))
    if plateau.sum() < 20:
        return np.zeros_like(plateau)
    # LPS (x, y) of every column, taken at the plateau's top level; back to the (z, y, x) order of the box
    cols = np.argwhere(np.ones(plateau.shape, bool))
    level = top if up > 0 else n - 1 - top
    idx = np.insert(cols, 0, level, axis=1)               # (axial, other, other) as in np.moveaxis(.., ax, 0)
    order = [1, 2]
    order.insert(ax, 0)                                   # position of each original axis in ``idx``
    full = idx[:, order]
    pts = index_to_lps(ref, full + np.array([b.start for b in box]))
    px, py = pts[:, 0].reshape(plateau.shape), pts[:, 1].reshape(plateau.shape)
    xs, ys = px[plateau], py[plateau]
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    xc, yc, hx, hy = 0.5 * (x0 + x1), 0.5 * (y0 + y1), 0.5 * (x1 - x0), 0.5 * (y1 - y0)
    out = np.zeros(plateau.shape, bool)
    for sign in (-1.0, 1.0):
        e = ((px - (xc + sign * 0.51 * hx)) / (0.27 * hx)) ** 2 + ((py - yc) / (0.6 * hy)) ** 2
        out |= (e < 1.0) & has_t
    return out


def subchondral_rois(ct_image: sitk.Image, bones: sitk.Image, side: str | None = None,
                     start_mm: float | None = None, end_mm: float | None = None,
                     settings: RoiSettings | None = None, *, return_info: bool = False):
    """The four subchondral ROIs as a UInt8 label image in the CT's geometry (MFC=1, LFC=2, MTP=3, LTP=4).

    ``bones`` is a bone label image (femur=1, tibia=2, ...) on the CT grid, e.g. from
    :func:`~ctsma.segmentation.segment_bones`. ``side`` (``'L'``/``'R'``) overrides the anatomical laterality.
    """
    s = settings or RoiSettings()
    if start_mm is not None or end_mm is not None:
        s = dataclasses.replace(s, start_mm=s.start_mm if start_mm is None else float(start_mm),
                                end_mm=s.end_mm if end_mm is None else float(end_mm))
    if not 0 <= s.start_mm < s.end_mm:
        raise UserError(f"ROI depths must satisfy 0 <= start < end (got start {s.start_mm} mm, end {s.end_mm} mm)")
    bones = check_image(bones, what="bone segmentation", pixel_type=sitk.sitkUInt8)
    if ct_image is not None:
        check_same_geometry(ct_image, bones, what_a="CT", what_b="bone segmentation")
    lab = sitk.GetArrayFromImage(bones)
    sp = spacing_zyx(bones)
    femur, tibia = lab == BONES["femur"], lab == BONES["tibia"]
    if femur.sum() == 0 or tibia.sum() == 0:
        raise InputImageError("the bone segmentation lacks the femur or the tibia (labels 1 and 2); "
                              "subchondral ROIs need both")
    if side is not None:
        side = str(side).strip().upper()[:1]
        if side not in ("L", "R"):
            raise UserError(f"knee side must be L or R, not {side!r}")
    anat = knee_side(lab, bones)
    side_used = side or anat
    if side_used is None:
        raise LateralityError("cannot tell a left from a right knee: no fibula in the bone segmentation and no "
                              "side given; pass the side (L or R) from the scan's metadata")
    # crop to the joint: bone within contact_mm + end_mm of the other bone
    margin = s.contact_mm + s.end_mm + 3.0
    near = (ndi.distance_transform_edt(~tibia, sampling=sp) <= margin) & femur
    near |= (ndi.distance_transform_edt(~femur, sampling=sp) <= margin) & tibia
    if not near.any():
        raise InputImageError(f"femur and tibia are more than {margin:.0f} mm apart; no joint to place ROIs on")
    box = ndi.find_objects(near.astype(np.uint8))[0]
    pad = [int(np.ceil(margin / d)) for d in sp]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, lab.shape))
    f, t = femur[box], tibia[box]
    band_f, gap_f = _band(f, t, sp, s)
    band_t, gap_t = _band(t, f, sp, s)
    out = np.zeros(lab.shape, np.uint8)
    if not band_f.any() or not band_t.any():
        raise InputImageError("no load-bearing surface found between femur and tibia (is the joint in view and "
                              f"are the bones within {s.contact_mm:g} mm of each other?)")
    offset = np.array([b.start for b in box])
    fz = np.argwhere(band_f)
    fx = index_to_lps(bones, fz[:: max(1, len(fz) // 50000)] + offset)[:, 0]
    split_x = _notch_x(fx)
    medial_sign = 1.0 if side_used == "R" else -1.0
    # x of every voxel in the box (LPS): the grid may be rotated, so compute from the geometry per voxel
    zyx = np.indices(f.shape).reshape(3, -1).T + offset
    xs = index_to_lps(bones, zyx)[:, 0].reshape(f.shape)
    medial = (xs - split_x) * medial_sign > 0
    sub = out[box]
    fp_f, fp_t, gaps = _footprints(f, t, bones, box, medial, sp, s)
    for band, fp, (m_lab, l_lab) in ((band_f, fp_f, ("MFC", "LFC")), (band_t, fp_t, ("MTP", "LTP"))):
        sub[band & fp & medial] = ROIS[m_lab]
        sub[band & fp & ~medial] = ROIS[l_lab]
    result = like(out, bones)
    if not return_info:
        return result
    voxel_ml = float(np.prod(sp)) / 1000.0
    info = {"side": side_used, "side_from": "metadata" if side else "anatomy (fibula)", "anatomical_side": anat,
            "split_x_mm": split_x, "start_mm": s.start_mm, "end_mm": s.end_mm, "contact_mm": s.contact_mm,
            "contact_margin_mm": s.contact_margin_mm, "narrowest_gap_mm": gaps,
            "roi_ml": {k: float((out == v).sum() * voxel_ml) for k, v in ROIS.items()}}
    return result, info
