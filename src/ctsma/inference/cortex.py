"""A knee's cortical shell read from its CT: bone-tissue HU and cortical width by a blurred-slab fit.

A knee's bone tissue has its own HU (mineralisation differs between people), and a CT student that reads one
8 mm patch cannot tell denser tissue from denser structure (docs/training.md, *The knee's own tissue HU*). The
cortex is the one place where the CT shows bone tissue without marrow, but it is about as thin as the scanner's
blur, so its peak HU follows its thickness as much as its tissue. This module separates the two. Along the
outward normals of the segmented surface it finds each profile's cortical peak (on a cubic-spline profile), takes
the CT's own voxels near each normal line, bins them by their distance from that peak (an oversampled edge spread,
as in the slanted-edge method of measuring a PSF), and fits the mean with a slab of tissue ``B`` and width ``c``
between an inner level ``I`` and an outer level ``S``, blurred by a Gaussian of known width:

    m(u) = S + (B - S) Phi((a - u) / s) + (I - B) Phi((a - c - u) / s)

with ``s`` the CT's in-plane blur, by default measured from the CT's own air/body edge
(:func:`ctsma.harmonise.inplane_edge_sigma`). Only surface points whose normal lies within ``MAX_NORMAL_Z`` of the
axial plane are used, so that the in-plane blur applies (the axial plane is the image's slices, whatever its
direction cosines); where the field of view cuts a bone, the cut is not surface. On rendered cylinders (partial
volume, PSF, noise) it recovers ``B`` within 15 HU and ``c`` within 0.02 mm, also with anisotropic pixels, a bone
cut by the image's edge or a bone that ends inside the field of view (Testing/test_cortex.py).

On real anatomy the slab is a model of a curved, irregular shell under a segmentation's surface, so the values are
biased (on the phantom the width reads 0.16-0.42 mm wide and the tissue HU 300-800 HU low, most of all on the
femur). They are knee-level features, to be related to an outcome by a fit, not calibrated values. On the
phantom's 72 knees of two cohorts the two bones' ``B`` and ``c`` give the true bone-tissue HU at r 0.95-0.96 (a
linear fit, leave one knee out), against 0.64-0.76 for the cortical peak alone
(benchmarks/bench_knee_calibration.py, docs/training.md).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.optimize import least_squares
from scipy.special import ndtr

from ..errors import InputImageError

MAX_NORMAL_Z = 0.2  # |n_z| of the surface normal: profiles close to the axial plane
MAX_PROFILES = 20000  # per bone, drawn at random (seeded) from the eligible surface voxels
MIN_PROFILES = 200
STEP_MM = 0.1  # of the interpolated profiles that locate the peaks
PEAK_WINDOW_MM = (-1.5, 1.0)  # where the cortical peak is looked for, relative to the segmentation's surface
ALIGNED_MM = 2.5  # half length of the mean profile, from the peak
BIN_MM = 0.05  # of the mean profile
REACH_MM = PEAK_WINDOW_MM[1] + ALIGNED_MM + STEP_MM  # half length of the interpolated profiles
MIN_PEAK_HU = 600.0  # a profile whose peak is lower crossed no cortex (a joint surface, a segmentation error)
OUTER_HU = (-300.0, 250.0)  # the outer end of a kept profile: soft tissue, not another bone or air
NORMAL_SMOOTH_MM = 1.0
LATERAL_MM = 0.75  # voxels this close to a normal line sample its profile
CHUNK = 1000  # profiles whose voxels are binned at once
FIELDS = ("tissue_hu", "width_mm", "inner_hu", "outer_hu", "peak_hu", "n_profiles")


def _model(p, u, s):
    outer, inner, tissue, width, edge = p
    return outer + (tissue - outer) * ndtr((edge - u) / s) + (inner - tissue) * ndtr((edge - width - u) / s)


def fit_profile(u: np.ndarray, m: np.ndarray, sigma_mm: float) -> dict:
    """Fit the blurred-slab model to a mean profile ``m`` sampled at ``u`` (mm, outward positive, 0 at the peak)."""
    ok = np.isfinite(m)
    u, m = u[ok], m[ok]
    p0 = [m[-1], m[0], m.max() + 300.0, 0.8, 0.4]
    lower, upper = [-1024, -1024, -1024, 0.05, -ALIGNED_MM], [3071, 3071, 6000, 2 * ALIGNED_MM, ALIGNED_MM]
    fit = least_squares(lambda p: _model(p, u, sigma_mm) - m, p0, bounds=(lower, upper))
    outer, inner, tissue, width, _ = fit.x
    if not fit.success or not lower[2] < tissue < upper[2] or not lower[3] < width < upper[3]:
        # no slab fits (a profile without a cortex): a value at a bound is not a measurement
        tissue = width = math.nan
    return {"tissue_hu": float(tissue), "width_mm": float(width), "inner_hu": float(inner), "outer_hu": float(outer),
            "peak_hu": float(m.max())}


def mean_profile(ct: np.ndarray, bone: np.ndarray, spacing_zyx, *, seed: int = 0):
    """The CT's mean profile across the surface of ``bone`` (bool, same grid as ``ct``), 0 at the cortical peak.

    Returns ``(u, mean, n)``: ``n`` the profiles that passed the checks (a cortical peak, soft tissue outside), and
    ``mean`` NaN in a bin that no voxel fell in, or None when ``n`` is below ``MIN_PROFILES``."""
    sp = np.asarray(spacing_zyx, np.float64)
    u = np.arange(-ALIGNED_MM, ALIGNED_MM + 1e-9, BIN_MM)
    zz, yy, xx = np.nonzero(bone)
    if len(zz) == 0:
        return u, None, 0
    pad = int(math.ceil((REACH_MM + 3 * NORMAL_SMOOTH_MM) / sp.min())) + 1
    lo = np.maximum([zz.min() - pad, yy.min() - pad, xx.min() - pad], 0)
    hi = np.minimum([zz.max() + pad + 1, yy.max() + pad + 1, xx.max() + pad + 1], bone.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    b = bone[box]
    img = np.asarray(ct[box], np.float32)
    sd = (ndi.distance_transform_edt(~b, sampling=sp) - ndi.distance_transform_edt(b, sampling=sp)).astype(np.float32)
    g = np.stack(np.gradient(ndi.gaussian_filter(sd, NORMAL_SMOOTH_MM / sp), *sp))  # float32: a bone's box is large
    gn = np.linalg.norm(g, axis=0) + 1e-12
    surface = b & ~ndi.binary_erosion(b, border_value=1)  # a bone cut by the field of view has no surface there
    cand = np.argwhere(surface & (np.abs(g[0]) / gn < MAX_NORMAL_Z))
    if len(cand) == 0:
        return u, None, 0
    if len(cand) > MAX_PROFILES:
        rng = np.random.default_rng(seed)
        cand = cand[np.sort(rng.choice(len(cand), MAX_PROFILES, replace=False))]
    c = tuple(cand.T)
    n = (g[(slice(None),) + c] / gn[c]).T  # outward unit normals (z, y, x), mm
    t = np.arange(-REACH_MM, REACH_MM + 1e-9, STEP_MM)
    pts = cand[:, None, :] + t[None, :, None] * n[:, None, :] / sp
    prof = ndi.map_coordinates(img, pts.reshape(-1, 3).T, order=3, mode="nearest").reshape(len(cand), len(t))
    # the peak, to a fraction of a step by a parabola through its neighbours
    win = (t >= PEAK_WINDOW_MM[0]) & (t <= PEAK_WINDOW_MM[1])
    k = np.clip(np.argmax(np.where(win, prof, -np.inf), axis=1), 1, len(t) - 2)
    r = np.arange(len(k))
    y0, y1, y2 = prof[r, k - 1], prof[r, k], prof[r, k + 1]
    den = y0 - 2 * y1 + y2
    off = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
    peak_at = t[k] + STEP_MM * np.clip(off, -0.5, 0.5)
    # the profile's outer end, ALIGNED_MM beyond its peak (inside the sampled reach: REACH_MM covers it)
    outer = np.array([np.interp(p + ALIGNED_MM, t, row) for p, row in zip(peak_at, prof)])
    keep = (y1 > MIN_PEAK_HU) & (outer > OUTER_HU[0]) & (outer < OUTER_HU[1])
    if keep.sum() < MIN_PROFILES:
        return u, None, int(keep.sum())
    return u, _edge_spread(img, cand[keep], n[keep], peak_at[keep], sp, u), int(keep.sum())


def _edge_spread(img, cand, n, peak_at, sp, u):
    """The mean HU of the CT's own voxels by their distance along the normal from each profile's peak.

    Interpolated profiles would blur the thin cortex further, and the peaks they find sit on the interpolation's
    sub-voxel phase. The voxels themselves, taken near each normal line (within ``LATERAL_MM``) in the same
    slice and binned by their offset from the peak, sample the CT's blurred profile at scattered sub-voxel
    positions: the oversampled edge spread of the slanted-edge method. Offsets that leave the image are dropped."""
    reach = ALIGNED_MM + max(abs(x) for x in PEAK_WINDOW_MM) + STEP_MM  # a peak lies up to that far from its voxel
    wy, wx = int(math.ceil(reach / sp[1])) + 1, int(math.ceil(reach / sp[2])) + 1
    dy, dx = (d.ravel() for d in np.mgrid[-wy:wy + 1, -wx:wx + 1])
    oy, ox = dy * sp[1], dx * sp[2]
    count = np.zeros(len(u))
    total = np.zeros(len(u))
    for i in range(0, len(cand), CHUNK):  # (profiles, offsets) arrays a chunk at a time: tens of MB, not GB
        c, nn, pk = cand[i:i + CHUNK], n[i:i + CHUNK], peak_at[i:i + CHUNK]
        along = oy[None, :] * nn[:, 1:2] + ox[None, :] * nn[:, 2:3]  # mm
        lateral2 = oy[None, :] ** 2 + ox[None, :] ** 2 - along ** 2
        pos = along - pk[:, None]
        yy, xx = c[:, 1:2] + dy[None, :], c[:, 2:3] + dx[None, :]
        use = ((lateral2 < LATERAL_MM ** 2) & (pos > u[0] - BIN_MM / 2) & (pos < u[-1] + BIN_MM / 2)
               & (yy >= 0) & (yy < img.shape[1]) & (xx >= 0) & (xx < img.shape[2]))
        vals = img[np.broadcast_to(c[:, 0:1], yy.shape)[use], yy[use], xx[use]].astype(np.float64)
        b = np.clip(np.rint((pos[use] - u[0]) / BIN_MM).astype(np.int64), 0, len(u) - 1)
        count += np.bincount(b, minlength=len(u))
        total += np.bincount(b, vals, minlength=len(u))
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def cortical_shell(ct: sitk.Image, bones: sitk.Image, labels: dict, *, psf_sigma_mm: float | None = None,
                   seed: int = 0) -> dict:
    """Fit the cortical shell of each bone in ``labels`` (name -> label value of ``bones``) of a CT.

    Returns ``{name: {"tissue_hu", "width_mm", "inner_hu", "outer_hu", "peak_hu", "n_profiles"}}``, each value
    NaN for a bone with too few usable profiles, and ``"sigma_mm"``: the blur used. ``psf_sigma_mm`` is the CT's
    in-plane PSF (Gaussian sigma, mm); by default it is measured from the CT's air/body edge, and a CT without
    one (a field of view inside the body) needs it given."""
    from ..harmonise import inplane_edge_sigma

    from ..io.images import check_same_geometry

    check_same_geometry(ct, bones, what_a="CT", what_b="bone segmentation")
    if psf_sigma_mm is None:
        edge = inplane_edge_sigma(ct)
        if edge is None:
            raise InputImageError("the CT has too few air/body edges to measure its blur; give its PSF sigma")
        psf_sigma_mm = edge["sigma_mm"]
    sp = ct.GetSpacing()
    sigma = float(psf_sigma_mm)
    arr = sitk.GetArrayViewFromImage(ct)
    lab = sitk.GetArrayViewFromImage(bones)
    out = {"sigma_mm": sigma}
    for name, value in labels.items():
        u, m, n = mean_profile(arr, lab == value, sp[::-1], seed=seed)
        row = dict.fromkeys(FIELDS[:-1], math.nan) if m is None else fit_profile(u, m, sigma)
        out[name] = row | {"n_profiles": n}
    return out
