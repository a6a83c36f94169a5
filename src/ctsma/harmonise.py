"""CT resolution (in-plane from the image, through-plane from the header), matched to a model's training CTs.

A student reads the texture of blurred trabecular bone, so its estimates depend on the sharpness of the CT's
reconstruction: measured on held-out phantom knees, a sharper kernel shifts BV/TV and Tb.Th by 1.6 and 2.7
between-knee SDs (``benchmarks/bench_ct_shift.py``). The in-plane sharpness is measured here on the air/body
boundary, the one strong, simple edge that every knee CT has: profiles along x and along y that cross it are each
fitted with an error-function step (a Gaussian-blurred edge), each fitted sigma is scaled by the cosine between
the profile and the edge's normal (from Gaussian derivatives), and the median is the CT's in-plane edge sigma
in mm. The dataset build records it for every training CT, the training writes the cohort's median into
the student's model file, and inference blurs a sharper CT in-plane to that value (an exact Gaussian, applied in
the Fourier domain) before cutting patches. The patches are cut by linear interpolation, which blurs too, the more
the coarser the grid (:func:`interpolation_variance`), so the value a CT is matched to allows for the difference
between its pixel size and the training CTs' (:func:`inplane_target`).
A softer CT cannot be sharpened: it gets a warning.

The through-plane resolution has no such edge in a knee CT (the body boundary runs along z), so it comes from the
header: the nominal slice thickness, which by its IEC definition is the FWHM of the slice sensitivity profile
(DICOM SliceThickness where the image was read from DICOM, else the slice spacing, i.e. contiguous slices), plus
the linear interpolation between slices that cuts the patches.
A CT with thinner slices than the training CTs is blurred along z by the Gaussian that brings this through-plane
sigma to theirs (:func:`through_plane_blur`); one with thicker slices gets a warning.

The fit uses point samples, so for edges much sharper than a voxel (sigma below about 0.3 voxel) it reads low; the
same estimator is used on training and test CTs, and the docs give its measured behaviour.
"""

from __future__ import annotations

import json
import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, special

from .io.images import PADDING_HU, SLICE_THICKNESS_TAG
from .segmentation.geometry import crop_box

AIR_HU, AIR_MAX_HU, BODY_MIN_HU = -500.0, -900.0, -300.0
MIN_EDGES = 50
MIN_COS = 0.7   # profiles at most 45 degrees off the edge normal
MATCH_TOLERANCE_MM = 0.02  # a CT sharper than a reference by less than this is used as it is
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
PATCH = (0.5, 16)  # (sample step mm, samples per side) of the students' CT patches; a model file gives its own


def _fit_steps(x: np.ndarray, y: np.ndarray, iters: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares fits of ``l + (h - l) * Phi((x - c) / s)`` to each row of ``y`` (batched Levenberg-Marquardt).
    Returns (c, s, ok) in units of ``x``; ``ok``: finite, with an RMS residual under 10 % of the step."""
    n = len(y)
    lo, hi = y[:, :2].mean(1), y[:, -2:].mean(1)
    e = (y - lo[:, None]) / np.maximum(hi - lo, 1e-6)[:, None]
    c = np.array([np.interp(0.5, ei, x) if np.all(np.diff(ei) >= 0) else x[np.argmin(np.abs(ei - 0.5))] for ei in e])
    p = np.stack([lo, hi, c, np.full(n, 0.6)], 1)
    lam = np.full(n, 1e-2)

    def resid(p):
        z = (x[None] - p[:, 2:3]) / p[:, 3:4]
        return y - (p[:, :1] + (p[:, 1:2] - p[:, :1]) * 0.5 * (1 + special.erf(z / math.sqrt(2)))), z

    r, z = resid(p)
    cost = (r ** 2).sum(1)
    for _ in range(iters):
        phi = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        big = 0.5 * (1 + special.erf(z / math.sqrt(2)))
        amp = (p[:, 1:2] - p[:, :1])
        J = np.stack([1 - big, big, -amp * phi / p[:, 3:4], -amp * phi * z / p[:, 3:4]], -1)  # (n, m, 4)
        A = np.einsum("nmi,nmj->nij", J, J)
        g = np.einsum("nmi,nm->ni", J, r)
        A_d = A + np.eye(4)[None] * (lam[:, None] * np.diagonal(A, axis1=1, axis2=2) + 1e-9)[:, None]
        step = np.linalg.solve(A_d, g[..., None])[..., 0]
        q = p + step
        q[:, 3] = np.clip(q[:, 3], 0.02, 10.0)
        rq, zq = resid(q)
        cq = (rq ** 2).sum(1)
        better = cq < cost
        p[better], r[better], z[better], cost[better] = q[better], rq[better], zq[better], cq[better]
        lam = np.clip(np.where(better, lam * 0.3, lam * 10.0), 1e-6, 1e8)
    ok = np.isfinite(p).all(1) & (np.sqrt(cost / y.shape[1]) < 0.1 * np.abs(p[:, 1] - p[:, 0]))
    return p[:, 2], p[:, 3], ok


def _profiles(arr: np.ndarray, cos: np.ndarray, axis: int, half: int, limit: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 2*half+2 samples along array ``axis`` centred on air/body crossings (air first), and the cosine
    between the axis and the edge's normal at each (``cos``: that cosine for every voxel)."""
    a = np.moveaxis(arr, axis, -1)
    body = a > AIR_HU
    idx = np.argwhere(body[..., 1:] != body[..., :-1])
    idx = idx[(idx[:, -1] >= half) & (idx[:, -1] + half + 2 <= a.shape[-1])]
    if len(idx) > 4 * limit:
        idx = idx[rng.choice(len(idx), 4 * limit, replace=False)]
    if not len(idx):
        return np.zeros((0, 2 * half + 2)), np.zeros(0)
    offs = np.arange(-half, half + 2)
    lines = a[tuple(idx[:, :-1].T)]                                     # (n, length along axis)
    prof = np.take_along_axis(lines, idx[:, -1:] + offs[None], 1).astype(np.float64)
    c = np.moveaxis(cos, axis, -1)[tuple(idx.T)]
    flip = prof[:, 0] > prof[:, -1]
    prof[flip] = prof[flip, ::-1]
    step = prof[:, -1] - prof[:, 0]
    clean = (prof[:, :2].max(1) < AIR_MAX_HU) & (prof.min(1) >= PADDING_HU) & (prof[:, -2:].min(1) > BODY_MIN_HU) \
        & (np.diff(prof, axis=1).min(1) > -0.15 * step) & (c > MIN_COS)  # (padding to body: a cut, not an edge)
    return prof[clean][:limit], c[clean][:limit]


def _sample_slices(ct: sitk.Image, max_slices: int = 48) -> np.ndarray:
    """Up to ``max_slices`` evenly spaced axial slices (z, y, x), float32 (a copy: ``ct`` outlives the view)."""
    nz = ct.GetSize()[2]
    zs = np.unique(np.linspace(0, nz - 1, min(nz, max_slices)).round().astype(int))
    return sitk.GetArrayViewFromImage(ct)[zs].astype(np.float32)


def _edge_sigma(arr: np.ndarray, sp, edges_per_axis: int = 1500, seed: int = 0) -> dict | None:
    # the edge normal's direction in each slice: Gaussian derivatives (1 mm) in physical units
    gx = ndimage.gaussian_filter(arr, (0, 1.0 / sp[1], 1.0 / sp[0]), order=(0, 0, 1)) / sp[0]
    gy = ndimage.gaussian_filter(arr, (0, 1.0 / sp[1], 1.0 / sp[0]), order=(0, 1, 0)) / sp[1]
    norm = np.hypot(gx, gy) + 1e-6
    rng = np.random.default_rng(seed)
    out, n = {}, 0
    for axis, name, h, g in ((2, "x", sp[0], gx), (1, "y", sp[1], gy)):
        half = int(np.clip(math.ceil(2.5 / h), 3, 8))
        prof, cos = _profiles(arr, np.abs(g) / norm, axis, half, edges_per_axis, rng)
        if len(prof) < MIN_EDGES // 2:
            out[name] = math.nan
            continue
        x = np.arange(-half, half + 2) - 0.5
        c, s, ok = _fit_steps(x, prof)
        keep = ok & (np.abs(c) < 1.5) & (s < half / 2)
        # a profile along an axis crosses an edge whose normal is tilted by theta as a step of sigma / cos(theta)
        out[name] = float(np.median(s[keep] * cos[keep]) * h) if keep.sum() >= MIN_EDGES // 2 else math.nan
        n += int(keep.sum())
    vals = [v for v in out.values() if np.isfinite(v)]
    if n < MIN_EDGES or not vals:
        return None
    return {"sigma_mm": float(np.mean(vals)), "sigma_x_mm": out["x"], "sigma_y_mm": out["y"], "n_edges": n}


def inplane_edge_sigma(ct: sitk.Image) -> dict | None:
    """The CT's in-plane edge sigma in mm from its air/body boundary, or None when the CT has too few clean air
    edges (a field of view inside the body, say). Result: ``{"sigma_mm", "sigma_x_mm", "sigma_y_mm", "n_edges"}``."""
    return _edge_sigma(_sample_slices(ct), ct.GetSpacing())


def gaussian_blur(arr: np.ndarray, spacing, sigma_mm: float, sigma_z_mm: float = 0.0) -> np.ndarray:
    """``arr`` (z, y, x) blurred along x and y by an exact Gaussian of ``sigma_mm``, and along z by one of
    ``sigma_z_mm``, in the Fourier domain; ``spacing`` is (x, y) or (x, y, z) in mm (z needed for a z blur). The
    edges are padded with their own values, so nothing wraps around. Returns float32."""
    out = np.asarray(arr, np.float32)
    axes = [(2, spacing[0], sigma_mm), (1, spacing[1], sigma_mm)]
    axes = [(a, h, sg) for a, h, sg in axes if sg > 0] + ([(0, spacing[2], sigma_z_mm)] if sigma_z_mm > 0 else [])
    if not axes:
        return out.copy()
    for axis, h, sigma_mm in axes:
        pad = int(math.ceil(5 * sigma_mm / h)) + 1
        widths = [(0, 0)] * 3
        widths[axis] = (pad, pad)
        a = np.pad(out, widths, mode="edge")
        f = np.fft.rfftfreq(a.shape[axis], d=h)
        shape = [1, 1, 1]
        shape[axis] = len(f)
        gain = np.exp(-2 * (math.pi * sigma_mm * f) ** 2).reshape(shape)
        a = np.fft.irfft(np.fft.rfft(a, axis=axis) * gain, n=a.shape[axis], axis=axis)
        out = np.take(a, np.arange(pad, pad + out.shape[axis]), axis=axis).astype(np.float32)
    return out


def matching_blur(ct: sitk.Image, reference_mm: float, *, tolerance_mm: float = MATCH_TOLERANCE_MM,
                  sigma_mm: float | None = None) -> dict:
    """The in-plane Gaussian sigma (mm) after which the CT's edge sigma equals ``reference_mm``.

    Found on the estimator's own slices: start from sqrt(reference^2 - sigma^2), blur, measure again and rescale
    (at most 4 rounds, until within 0.005 mm), so a bias of the estimator at very sharp edges does not carry into
    the match. ``{"blur_mm": 0, ...}`` when the CT is within ``tolerance_mm`` of the reference or softer, or when
    its sharpness cannot be measured. ``sigma_mm``: the CT's edge sigma if already measured."""
    arr, sp = _sample_slices(ct), ct.GetSpacing()
    if sigma_mm is None:
        est = _edge_sigma(arr, sp)
        sigma_mm = None if est is None else est["sigma_mm"]
    out = {"blur_mm": 0.0, "sigma_mm": sigma_mm, "sigma_after_mm": sigma_mm}
    if sigma_mm is None or not np.isfinite(reference_mm) or sigma_mm >= reference_mm - tolerance_mm:
        return out
    need = math.sqrt(reference_mm ** 2 - sigma_mm ** 2)
    b = need
    for _ in range(4):
        est = _edge_sigma(gaussian_blur(arr, sp[:2], b), sp)
        if est is None:
            break
        out.update(blur_mm=b, sigma_after_mm=est["sigma_mm"])
        if abs(est["sigma_mm"] - reference_mm) < 0.005:
            break
        gain = math.sqrt(max(est["sigma_mm"] ** 2 - sigma_mm ** 2, 1e-8)) / b  # measured sigma per blur sigma
        b = need / gain
    return out


def blurred_crop(ct: sitk.Image, mask: np.ndarray, extent_mm: float, blur_mm: float,
                 blur_z_mm: float = 0.0) -> sitk.Image:
    """The part of ``ct`` that patches of ``extent_mm`` centred in ``mask`` (a (z, y, x) array on the CT grid) are
    cut from, blurred in-plane by ``blur_mm`` and along z by ``blur_z_mm`` (float32). The margin holds half a
    patch, the blur's reach and 2 voxels, so no patch sees the crop's edge; only the crop is blurred, which keeps
    a clinical CT's memory low."""
    sp = np.asarray(ct.GetSpacing())[::-1]  # z, y, x
    reach = np.array([4 * blur_z_mm, 4 * blur_mm, 4 * blur_mm])
    bz, by, bx = crop_box(mask, np.ceil((extent_mm / 2 + reach) / sp).astype(int) + 2)
    sub = ct[bx, by, bz]
    img = sitk.GetImageFromArray(gaussian_blur(sitk.GetArrayViewFromImage(sub), ct.GetSpacing(), blur_mm, blur_z_mm))
    img.CopyInformation(sub)
    return img


def interpolation_variance(spacing_mm: float, patch: tuple[float, int] = PATCH) -> float:
    """The variance (mm^2) that linear interpolation adds to the samples of a patch, averaged over them.

    ``patch`` is (sample step in mm, samples per side) of patches centred on voxel centres of a grid ``spacing_mm``
    apart, as :func:`ctsma.dataset.sampling.roi_centres` places them. A sample a fraction u of the way between two
    voxels gets weights 1 - u and u, a kernel of variance u (1 - u) spacing^2. Where the samples fall repeats on such
    a grid, so the mean is exact: close to spacing^2 / 6 (positions spread evenly) in general, but 1.5 times that for
    0.5-mm samples on 0.5-mm voxels (every sample half-way) and 0 on 0.25-mm voxels (none between voxels)."""
    step, n = patch
    u = np.mod((np.arange(n) + 0.5 - n / 2) * step / spacing_mm, 1.0)
    return float(np.mean(u * (1.0 - u))) * spacing_mm ** 2


def inplane_target(reference_mm: float, reference_spacing_mm: float | None, spacing_mm: float,
                   patch: tuple[float, int] = PATCH) -> float | None:
    """The in-plane edge sigma at which patches cut from a CT of in-plane pixel size ``spacing_mm`` are as sharp as
    those cut from training CTs of edge sigma ``reference_mm`` and pixel size ``reference_spacing_mm`` (``None``,
    from a model file that does not record it: ``reference_mm`` itself). ``None`` when the CT's pixels alone blur
    its patches more than the training CTs' patches are blurred: no edge sigma would do."""
    if not reference_spacing_mm:
        return reference_mm
    var = (reference_mm ** 2 + interpolation_variance(reference_spacing_mm, patch)
           - interpolation_variance(spacing_mm, patch))
    return math.sqrt(var) if var > 0 else None


def slice_thickness(ct: sitk.Image) -> tuple[float, str]:
    """The CT's nominal slice thickness in mm and where it came from: DICOM SliceThickness when the image carries
    it (:func:`ctsma.io.images.read_image` keeps it from a DICOM series), else the slice spacing."""
    if ct.HasMetaDataKey(SLICE_THICKNESS_TAG):
        try:
            t = float(ct.GetMetaData(SLICE_THICKNESS_TAG).strip().split("\\")[0])
        except ValueError:
            t = math.nan
        if math.isfinite(t) and t > 0:
            return t, "DICOM SliceThickness"
    return float(ct.GetSpacing()[2]), "slice spacing"


def through_plane_sigma(thickness_mm: float, spacing_mm: float, patch: tuple[float, int] = PATCH) -> float:
    """The through-plane Gaussian sigma (mm) of patches cut from slices of this nominal thickness (the FWHM of the
    slice sensitivity profile) and spacing (the linear interpolation between them, :func:`interpolation_variance`)."""
    return math.sqrt((thickness_mm / FWHM_PER_SIGMA) ** 2 + interpolation_variance(spacing_mm, patch))


def through_plane_blur(sigma_mm: float, reference_mm: float, tolerance_mm: float = MATCH_TOLERANCE_MM) -> float:
    """The Gaussian sigma (mm) along z that brings a through-plane sigma to the reference one; 0 when it is within
    ``tolerance_mm`` of it or above (thicker slices cannot be sharpened)."""
    return math.sqrt(reference_mm ** 2 - sigma_mm ** 2) if sigma_mm < reference_mm - tolerance_mm else 0.0


def training_reference(subject_info: dict | None, subjects) -> dict | None:
    """The student's CT reference from the dataset's per-knee records (``subject_info[s]["ct_resolution"]``) of its
    training knees: the median in-plane edge sigma, pixel size, slice spacing and slice thickness; None when no
    knee has a record.
    ``subject_info`` may be the JSON text a patch store keeps in its attributes."""
    if isinstance(subject_info, (str, bytes)):
        subject_info = json.loads(subject_info)
    recs = [((subject_info or {}).get(str(s)) or {}).get("ct_resolution") or {} for s in subjects]
    sig = [r["inplane_edge_sigma_mm"] for r in recs if r.get("inplane_edge_sigma_mm") is not None]
    dz = [r["spacing_mm"][2] for r in recs if r.get("spacing_mm")]
    thick = [r.get("slice_thickness_mm") or r["spacing_mm"][2] for r in recs if r.get("spacing_mm")]
    pix = [(r["spacing_mm"][0] + r["spacing_mm"][1]) / 2 for r in recs if r.get("spacing_mm")]
    if not sig:
        return None
    return {"inplane_edge_sigma_mm": float(np.median(sig)),
            "inplane_edge_sigma_range_mm": [float(np.min(sig)), float(np.max(sig))],
            "inplane_spacing_mm": float(np.median(pix)) if pix else None,
            "slice_spacing_mm": float(np.median(dz)) if dz else None,
            "slice_thickness_mm": float(np.median(thick)) if thick else None, "n_ct": len(sig),
            "estimator": "ctsma.harmonise.inplane_edge_sigma (error-function fits to air/body edges along x and y)"}


__all__ = ["inplane_edge_sigma", "gaussian_blur", "matching_blur", "blurred_crop", "interpolation_variance",
           "inplane_target", "slice_thickness", "through_plane_sigma", "through_plane_blur", "training_reference"]
