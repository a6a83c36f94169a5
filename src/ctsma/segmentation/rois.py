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
  tibia; where the segmentation fused the fibular head to the tibia, the posterolateral lobe it leaves, with a
  warning: :func:`knee_side_cue`). For a right knee medial is +x in LPS (towards the patient's left), for a left
  knee -x.

Hand-written (distance transforms from scipy/edt) because no library defines subchondral knee ROIs.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .. import BONES, ROIS
from ..config import setting
from ..errors import InputImageError, UserError
from ..io.images import check_image, check_same_geometry
from ..io.tables import side_letter
from .geometry import axial_axis, crop_box, edt_inside, index_to_lps, like, spacing_zyx


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
    condyle_height: float = setting(0.30, lo=0.02, hi=2.0,
                                    help="femoral ROIs: up to this height above each condyle's lowest surface "
                                         "point, as a fraction of the tibial plateau's half-width (0.30 x 37 mm "
                                         "= 11 mm): the distal, load-bearing part of the condyle")
    contact_margin_mm: float = setting(6.0, lo=0.1, hi=40.0,
                                       help="load-bearing surface: joint gap within this of the compartment's "
                                            "narrowest gap (mm)")


class LateralityError(UserError):
    """The knee's side could not be told from metadata or anatomy."""


def knee_side(bones: np.ndarray, img: sitk.Image) -> str | None:
    """``'R'`` or ``'L'`` from anatomy, or ``None`` when the anatomy does not tell (see :func:`knee_side_cue`)."""
    return knee_side_cue(bones, img)[0]


FUSED_LOBE_MIN_MM = 1.5  # smallest lateral shift of the proximal tibia's posterior half that is read as a fibula


def knee_side_cue(bones: np.ndarray, img: sitk.Image) -> tuple[str | None, str]:
    """The knee's side from anatomy and the cue used: ``(side or None, cue)``.

    1. ``fibula``: a fibula label lies lateral to the tibia.
    2. ``fibular head fused to the tibia``: where the proximal tibiofibular joint is not resolved (blurred CT, or
       the phantom's knees, whose fibular head abuts the tibia), the segmentation's tibia carries the fibular head
       as a posterolateral lobe. The posterior half of the tibia 12–42 mm below its top is then shifted laterally
       against the plateau (4–12 mm below the top); the shift must be at least ``FUSED_LOBE_MIN_MM``. On 74
       phantom knees (the demo cohort, the cohort of seed 1, two of the ``full`` preset), segmented automatically,
       it was 1.7–6.8 mm with every sign right; with the fibula removed from their true labels, the tibia alone
       gave no answer for 66 of 72 and never a wrong one. Weaker than a separate fibula: callers warn.
    """
    fib = bones == BONES["fibula"]
    tib = bones == BONES["tibia"]
    if tib.sum() < 50:
        return None, "none"
    # LPS +x is the patient's left: a lateral structure at lower x than the tibia is on the patient's right
    if fib.sum() >= 50:
        fx = index_to_lps(img, np.argwhere(fib)[:: max(1, int(fib.sum()) // 5000)])[:, 0].mean()
        tx = index_to_lps(img, np.argwhere(tib)[:: max(1, int(tib.sum()) // 5000)])[:, 0].mean()
        return ("R" if fx < tx else "L"), "fibula"
    p = index_to_lps(img, np.argwhere(tib)[:: max(1, int(tib.sum()) // 200_000)])
    top = float(np.percentile(p[:, 2], 99.5))          # the plateau's top (LPS +z is superior)
    plateau = p[(p[:, 2] > top - 12.0) & (p[:, 2] < top - 4.0)]
    below = p[(p[:, 2] > top - 42.0) & (p[:, 2] < top - 12.0)]
    if len(plateau) < 50 or len(below) < 50 or np.ptp(below[:, 2]) < 8.0:  # too little tibia below the joint
        return None, "none"
    posterior = below[below[:, 1] > plateau[:, 1].mean()]   # LPS +y is posterior
    if len(posterior) < 50:
        return None, "none"
    shift = float(posterior[:, 0].mean() - plateau[:, 0].mean())
    if abs(shift) < FUSED_LOBE_MIN_MM:
        return None, "none"
    return ("R" if shift < 0 else "L"), "fibular head fused to the tibia"


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


def _band(own: np.ndarray, other: np.ndarray, sp, s: RoiSettings, contact_mm: float | None) -> np.ndarray:
    """Voxels of ``own`` whose depth below its surface is in ``[start_mm, end_mm]``.

    With ``contact_mm``, also only those whose nearest surface point (the nearest outside voxel) lies within
    ``contact_mm`` of ``other``: the surface that faces the other bone.
    """
    depth, idx = ndi.distance_transform_edt(own, sampling=sp, return_indices=True)
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
    if contact_mm is not None:
        gap_field = ndi.distance_transform_edt(~other, sampling=sp)
        band[band] = gap_field[idx[0][band], idx[1][band], idx[2][band]] <= contact_mm
    return band


def _below_condyle_height(cols: "_Columns", col_medial, medial, height_mm: float) -> np.ndarray:
    """Voxels of the box at most ``height_mm`` above their compartment's lowest femoral surface point (along the
    superior-inferior image axis): the distal, load-bearing part of each condyle."""
    ok = cols.joint
    shape = [1, 1, 1]
    shape[cols.ax] = cols.n
    zi = np.arange(cols.n) if cols.up > 0 else np.arange(cols.n)[::-1]
    zi = zi.reshape(shape)
    keep = np.ones(medial.shape, bool)
    for col_sel, vox_sel in ((col_medial, medial), (~col_medial, ~medial)):
        if (ok & col_sel).any():
            low = int(cols.f_low[ok & col_sel].min())          # lowest voxel; the surface lies half a step below
            keep &= ~(vox_sel & ((zi - low + 0.5) * cols.sp_ax > height_mm))
    return keep


class _Columns:
    """The box's columns along the superior-inferior image axis, bottom to top: each column's lowest femur and
    highest tibia index, and its LPS (x, y) at the plateau's level."""

    def __init__(self, f: np.ndarray, t: np.ndarray, ref: sitk.Image, box, sp):
        self.ax = ax = axial_axis(ref)
        d = np.asarray(ref.GetDirection(), float).reshape(3, 3)
        self.up = np.sign(d[2, 2 - ax]) or 1.0           # +1 if the index along ``ax`` grows towards superior
        fa, ta = (np.moveaxis(v, ax, 0) for v in (f, t))
        if self.up < 0:
            fa, ta = fa[::-1], ta[::-1]
        self.n = n = fa.shape[0]
        self.has_f, self.has_t = fa.any(0), ta.any(0)
        self.f_low = np.where(self.has_f, np.argmax(fa, 0), n)                     # first femur voxel from below
        self.t_high = np.where(self.has_t, n - 1 - np.argmax(ta[::-1], 0), -1)     # last tibia voxel from below
        self.joint = self.has_f & self.has_t & (self.f_low > self.t_high)   # columns through femur above tibia
        self.sp_ax = sp[ax]
        self.pitch = max(s for k, s in enumerate(sp) if k != ax)   # column spacing (mm)
        top = int(self.t_high.max())
        level = top if self.up > 0 else n - 1 - top
        self.px, self.py = _column_xy(self.has_t.shape, ref, box, ax, level)
        self.shape3 = fa.shape

    def to_volume(self, cols: np.ndarray) -> np.ndarray:
        """A column mask broadcast to the box's (z, y, x) volume."""
        v = np.broadcast_to(cols[None], self.shape3)
        if self.up < 0:
            v = v[::-1]
        return np.moveaxis(v, 0, self.ax)


def _femoral_footprint(cols: _Columns, pu: np.ndarray, pv: np.ndarray, col_medial: np.ndarray, s: RoiSettings):
    """Load-bearing femoral footprint as a column mask, and each compartment's narrowest joint gap (mm).
    ``pu``, ``pv``: each column's coordinates (mm) in the plateau frame.

    For every column through both bones, the vertical joint gap is the distance from the femur's lowest voxel to
    the tibia's highest one below it. In each compartment (medial, lateral) the footprint is where that gap is
    within ``contact_margin_mm`` of its narrowest value: the contact area under load (for a condyle of radii
    a, b the area where its height above the lowest point is below the margin). With the ``box`` footprint it is
    that area's bounding box in the plateau's frame, narrowed antero-posteriorly to ``box_ap_fraction``.
    """
    ok = cols.joint
    gap = np.where(ok, (cols.f_low - cols.t_high - 1) * cols.sp_ax, np.inf)
    foot = np.zeros(gap.shape, bool)
    gaps = {}
    for name, side in (("medial", col_medial), ("lateral", ~col_medial)):
        g = gap[ok & side]
        if not g.size:
            continue
        gaps[name] = float(g.min())
        contact = ok & side & (gap <= g.min() + s.contact_margin_mm)
        if s.femoral_footprint == "box" and contact.sum() > 4:
            cu, cv = pu[contact], pv[contact]
            lo = np.array([cu.min(), cv.min()])
            hi = np.array([cu.max(), cv.max()])
            c, h = 0.5 * (lo + hi), 0.5 * (hi - lo) + 0.5 * cols.pitch
            h[1] *= s.box_ap_fraction
            contact = ok & side & (np.abs(pu - c[0]) <= h[0]) & (np.abs(pv - c[1]) <= h[1])
        foot |= contact
    return foot, gaps


@dataclass
class PlateauFrame:
    """The tibial plateau's own in-plane frame, in LPS mm: its centre, medio-lateral axis ``u`` (unit, +x-ish),
    antero-posterior axis ``v`` and the half-width/half-depth of its equivalent ellipse (the ellipse with the same
    second moments as the plateau's footprint)."""
    centre: np.ndarray
    u: np.ndarray
    v: np.ndarray
    half_width: float
    half_depth: float
    tilt_deg: float

    def coords(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) coordinates (mm) of LPS points (px, py) in this frame."""
        dx, dy = px - self.centre[0], py - self.centre[1]
        return dx * self.u[0] + dy * self.u[1], dx * self.v[0] + dy * self.v[1]


def _column_xy(shape2d, ref, box, ax, level) -> tuple[np.ndarray, np.ndarray]:
    """LPS x and y (mm) of every column (2-D array over the two in-plane axes), taken at axial index ``level``."""
    cols = np.argwhere(np.ones(shape2d, bool))
    idx = np.insert(cols, 0, level, axis=1)               # (axial, other, other) as in np.moveaxis(.., ax, 0)
    order = [1, 2]
    order.insert(ax, 0)                                   # position of each original axis in ``idx``
    pts = index_to_lps(ref, idx[:, order] + np.array([b.start for b in box]))
    return pts[:, 0].reshape(shape2d), pts[:, 1].reshape(shape2d)


def plateau_frame(t_high, has_t, px, py, sp_ax: float) -> PlateauFrame | None:
    """The plateau's frame from the tibia's top surface (``t_high``: index of each column's highest tibia voxel).

    The plateau is the set of columns whose top lies within 3 mm below a plane fitted robustly to the column tops
    (least squares, refitted on columns within -3..+1.5 mm of the previous fit: the tibial eminence above the
    plane and a fibula or rim below it drop out); its centre and axes are the centroid and principal axes of that
    footprint, its half-axes twice the square roots of the principal variances (exact for an elliptic plateau).
    Returns ``None`` when too few columns reach the top.
    """
    h = t_high * sp_ax
    cand = has_t & (t_high >= t_high.max() - int(np.ceil(12.0 / sp_ax)))
    if cand.sum() < 20:
        return None
    A = np.c_[px[cand], py[cand], np.ones(int(cand.sum()))]
    hc = h[cand]
    keep = np.ones(len(hc), bool)
    for _ in range(6):
        coef = np.linalg.lstsq(A[keep], hc[keep], rcond=None)[0]
        res = hc - A @ coef
        new = (res >= -3.0) & (res <= 1.5)
        if new.sum() < 20 or np.array_equal(new, keep):
            break
        keep = new
    res = hc - A @ coef
    on = res >= -3.0
    xs, ys = A[on, 0], A[on, 1]
    c = np.array([xs.mean(), ys.mean()])
    lam, vec = np.linalg.eigh(np.cov(np.vstack([xs - c[0], ys - c[1]])))
    u = vec[:, 1]
    if lam[1] < 1.1 * lam[0] or abs(u[0]) < np.cos(np.radians(35.0)):
        u = np.array([1.0, 0.0])                         # round or implausibly rotated plateau: the image x axis
        var_u = float(np.var(xs))
        var_v = float(np.var(ys))
    else:
        u = u * np.sign(u[0])
        var_u, var_v = float(lam[1]), float(lam[0])
    v = np.array([-u[1], u[0]])
    tilt = float(np.degrees(np.arctan(np.hypot(coef[0], coef[1]))))
    return PlateauFrame(c, u, v, 2.0 * np.sqrt(var_u), 2.0 * np.sqrt(var_v), tilt)


def _plateau_footprint(frame: PlateauFrame, pu, pv, has_t) -> np.ndarray:
    """Columns of the central region of each hemi-plateau: an ellipse centred at +-0.51 of the plateau's
    half-width from its centre along its medio-lateral axis, with semi-axes 0.27 x half-width and 0.6 x
    half-depth (the digital phantom's definition, which scales with the imaged plateau)."""
    out = np.zeros(pu.shape, bool)
    hw, hd = frame.half_width, frame.half_depth
    for sign in (-1.0, 1.0):
        e = ((pu - sign * 0.51 * hw) / (0.27 * hw)) ** 2 + (pv / (0.6 * hd)) ** 2
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
        from ..config import load_config
        # through the settings' own checks (ranges, NaN), as a config file's values go
        s = load_config(None, RoiSettings, overrides={**dataclasses.asdict(s),
                                                      "start_mm": s.start_mm if start_mm is None else float(start_mm),
                                                      "end_mm": s.end_mm if end_mm is None else float(end_mm)})
    if not 0 <= s.start_mm < s.end_mm:
        raise UserError(f"ROI depths must satisfy 0 <= start < end (got start {s.start_mm} mm, end {s.end_mm} mm)")
    bones = check_image(bones, what="bone segmentation", pixel_type=sitk.sitkUInt8)
    if ct_image is not None:
        check_same_geometry(ct_image, bones, what_a="CT", what_b="bone segmentation")
    lab = sitk.GetArrayFromImage(bones)
    sp = spacing_zyx(bones)
    femur, tibia = lab == BONES["femur"], lab == BONES["tibia"]
    if femur.sum() == 0 or tibia.sum() == 0:
        missing = " and no ".join(n for n, m in (("femur (label 1)", femur), ("tibia (label 2)", tibia)) if not m.any())
        raise InputImageError(f"the bone segmentation has no {missing} on the CT's grid; subchondral ROIs need the "
                              "femur and the tibia (a segmentation made on another grid keeps only what lies inside "
                              "the CT)")
    side = side_letter(side)
    anat, cue = knee_side_cue(lab, bones)
    side_used = side or anat
    if side_used is None:
        raise LateralityError("cannot tell a left from a right knee: no fibula in the bone segmentation and no "
                              "side given; pass the side (L or R; --side on the command line) from the scan's metadata")
    if not side and cue != "fibula":
        warnings.warn(f"knee side {anat} inferred from the shape of the proximal tibia (no separate fibula: its "
                      "head is fused to the tibia in the segmentation); pass the side (L or R) from the scan's "
                      "metadata if it says otherwise", stacklevel=2)
    elif side and anat and anat != side:  # the given side wins, but a wrong one swaps medial and lateral silently
        warnings.warn(f"the knee side given, {side}, is not the one its anatomy shows ({anat}, from the {cue}): the "
                      "ROIs follow the side given, so medial and lateral are swapped if it is wrong; check the "
                      "scan's metadata", stacklevel=2)
    # crop to the joint: bone within contact_mm + end_mm of the other bone
    margin = s.contact_mm + s.end_mm + 3.0
    # the distances are only needed between femur and tibia: within the box of the two (the same distances as on
    # the whole CT, since every femur and tibia voxel is inside it)
    both = crop_box(femur | tibia, 0)
    fb, tb = femur[both], tibia[both]
    near = (edt_inside(~tb, sp) <= margin) & fb  # `edt`: several times faster than scipy
    near |= (edt_inside(~fb, sp) <= margin) & tb
    if not near.any():
        raise InputImageError(f"femur and tibia are more than {margin:.0f} mm apart; no joint to place ROIs on")
    box = tuple(slice(a.start + b.start, a.start + b.stop)
                for a, b in zip(both, ndi.find_objects(near.astype(np.uint8))[0]))
    pad = [int(np.ceil(margin / d)) for d in sp]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, lab.shape))
    f, t = femur[box], tibia[box]
    band_f = _band(f, t, sp, s, None)         # the femur's band is bounded by the condyle height instead
    band_t = _band(t, f, sp, s, s.contact_mm)
    out = np.zeros(lab.shape, np.uint8)
    if not band_f.any() or not band_t.any():
        raise InputImageError("no load-bearing surface found between femur and tibia (is the joint in view and "
                              f"are the bones within {s.contact_mm:g} mm of each other?)")
    offset = np.array([b.start for b in box])
    cols = _Columns(f, t, bones, box, sp)
    frame = plateau_frame(cols.t_high, cols.has_t, cols.px, cols.py, cols.sp_ax)
    if frame is None:      # no plateau reaches the top (a tibia cut by the field of view): image axes, no tibial ROI
        c = np.array([cols.px[cols.has_t].mean(), cols.py[cols.has_t].mean()])
        frame = PlateauFrame(c, np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.0, 0.0, 0.0)
    # medio-lateral coordinate u of every voxel in the box (the grid may be oblique: from the geometry per voxel)
    zyx = np.indices(f.shape).reshape(3, -1).T + offset
    pts = index_to_lps(bones, zyx)
    vu = frame.coords(pts[:, 0], pts[:, 1])[0].reshape(f.shape)
    split_u = _notch_x(vu[band_f][:: max(1, int(band_f.sum()) // 50000)])
    medial_sign = 1.0 if side_used == "R" else -1.0     # u points to +x (the patient's left)
    medial = (vu - split_u) * medial_sign > 0
    pu, pv = frame.coords(cols.px, cols.py)
    col_medial = (pu - split_u) * medial_sign > 0
    foot_f, gaps = _femoral_footprint(cols, pu, pv, col_medial, s)
    foot_t = foot_f if s.tibial_footprint == "contact" else (
        _plateau_footprint(frame, pu, pv, cols.has_t) if frame.half_width > 0 else np.zeros_like(foot_f))
    condyle_mm = s.condyle_height * (frame.half_width or 37.0)   # 37 mm: a typical plateau half-width
    band_f &= _below_condyle_height(cols, col_medial, medial, condyle_mm)
    sub = out[box]
    for band, fp, (m_lab, l_lab) in ((band_f, cols.to_volume(foot_f), ("MFC", "LFC")),
                                     (band_t, cols.to_volume(foot_t), ("MTP", "LTP"))):
        sub[band & fp & medial] = ROIS[m_lab]
        sub[band & fp & ~medial] = ROIS[l_lab]
    result = like(out, bones)
    if not return_info:
        return result
    voxel_ml = float(np.prod(sp)) / 1000.0
    info = {"side": side_used, "side_from": "metadata" if side else f"anatomy ({cue})", "anatomical_side": anat,
            "split_u_mm": split_u,
            "plateau": {"centre_lps_mm": [float(v) for v in frame.centre], "ml_axis": [float(v) for v in frame.u],
                        "half_width_mm": frame.half_width, "half_depth_mm": frame.half_depth,
                        "tilt_deg": frame.tilt_deg}, "start_mm": s.start_mm, "end_mm": s.end_mm, "contact_mm": s.contact_mm,
            "contact_margin_mm": s.contact_margin_mm, "narrowest_gap_mm": gaps,
            "condyle_height_mm": condyle_mm,
            "roi_ml": {k: float((out == v).sum() * voxel_ml) for k, v in ROIS.items()}}
    return result, info
