"""MR (BFFE) and clinical CT simulation from the analytic knee.

Both images are built the same way: evaluate the anatomy at the voxel centres (MR: the
anatomical frame itself; CT: the centres mapped through the ground-truth CT->MR transform),
compute partial volumes of bone, cortex/plate and trabecular space from the signed distances,
compute the trabecular bone volume fraction of each voxel by averaging the microstructure on a
fine sub-grid (``*_subsample_mm``), mix tissue intensities, then apply the point-spread
function and noise (MR: smooth bias field and Rician noise; CT: correlated quantum noise).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .anatomy import TISSUES
from .texture import occupancy, subsample_offsets

CHUNK = 1 << 20

_MR_KEYS = {"air": "air", "skin": "skin", "fat": "fat", "muscle": "muscle", "fluid": "fluid", "meniscus": "meniscus",
            "femoral_cartilage": "cartilage", "tibial_cartilage": "cartilage", "patellar_cartilage": "cartilage"}


def _lut(values: dict) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float64)
    for tissue, code in TISSUES.items():
        key = _MR_KEYS.get(tissue)
        if key is not None:
            lut[code] = values[key]
    return lut


def mr_grid(settings) -> dict:
    sp = np.asarray(settings.mr_spacing, dtype=np.float64)
    size = [int(round(f / d)) for f, d in zip(settings.mr_fov, sp)]
    origin = -(np.asarray(size) - 1) / 2.0 * sp
    return {"size": size, "spacing": sp.tolist(), "origin": np.round(origin, 6).tolist()}


def grid_points(grid: dict) -> np.ndarray:
    size, sp, org = grid["size"], grid["spacing"], grid["origin"]
    zz, yy, xx = np.meshgrid(*[org[i] + sp[i] * np.arange(size[i]) for i in (2, 1, 0)], indexing="ij")
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()], -1)


def render(model, pts: np.ndarray, spacing_xyz, subsample_mm: float, J=None) -> dict:
    """Labels and volume fractions at the points ``pts`` (MR mm; one per voxel, z-y-x order).

    Returns ``tissue``, ``roi`` (uint8), ``soft`` label, ``B`` (bone fraction), ``Tr`` (trabecular
    region fraction), ``bvf`` (bone volume fraction within the trabecular region).
    """
    n = len(pts)
    h = float(np.mean(spacing_xyz))
    offsets, hsub = subsample_offsets(spacing_xyz, subsample_mm)
    out = {k: np.empty(n, t) for k, t in (("tissue", np.uint8), ("roi", np.uint8), ("soft", np.uint8),
                                           ("B", np.float32), ("Tr", np.float32), ("bvf", np.float32))}
    for s in range(0, n, CHUNK):
        e = model.evaluate(pts[s:s + CHUNK], design_margin=h)
        sl = slice(s, s + len(e["dist"]))
        dist = e["dist"].astype(np.float64)
        B = np.clip(0.5 - dist / h, 0.0, 1.0)
        Tr = np.clip(0.5 - (dist + e["shell"]) / h, 0.0, 1.0)
        bvf = np.zeros(len(dist), np.float32)
        idx = np.flatnonzero(Tr > 0)
        if idx.size:
            bvf[idx] = occupancy(pts[s:s + CHUNK][idx], e["near"][idx], e["tp"][idx], e["tr"][idx], model.fields,
                                 offsets, hsub, tw=e["tw"][idx], J=J)
        out["tissue"][sl], out["roi"][sl], out["soft"][sl] = e["tissue"], e["roi"], e["soft"]
        out["B"][sl], out["Tr"][sl], out["bvf"][sl] = B, Tr, bvf
    return out


def _image(arr: np.ndarray, grid: dict, dtype) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(dtype, copy=False))
    img.SetSpacing([float(v) for v in grid["spacing"]])
    img.SetOrigin([float(v) for v in grid["origin"]])
    return img


def bone_labels(tissue: np.ndarray) -> np.ndarray:
    """Bone labels 1..4 plus cartilage 10..12; everything else 0."""
    keep = np.isin(tissue, [1, 2, 3, 4, 10, 11, 12])
    return np.where(keep, tissue, 0).astype(np.uint8)


def simulate_mr(model, settings, rng) -> tuple[dict, dict]:
    """The BFFE image and MR-space label volumes."""
    grid = mr_grid(settings)
    shape = tuple(grid["size"][::-1])
    r = render(model, grid_points(grid), grid["spacing"], settings.mr_subsample_mm)
    mat = model.p["materials"]["mr"]
    lut = _lut(mat)
    sig = ((1.0 - r["B"]) * lut[r["soft"]] + r["Tr"] * (1.0 - r["bvf"]) * mat["marrow"]).reshape(shape)
    fw = settings.mr_psf_fwhm_vox
    if fw > 0:
        sig = ndimage.gaussian_filter(sig, fw / 2.3548, mode="nearest")
    # smooth multiplicative bias: exp of a random low-order polynomial, peak |log| = mr_bias
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij", sparse=True)
    c = rng.normal(size=7)
    poly = c[0] * xx + c[1] * yy + c[2] * zz + c[3] * xx * yy + c[4] * yy * zz + c[5] * xx * xx + c[6] * zz * zz
    poly = poly / max(np.abs(poly).max(), 1e-9) * settings.mr_bias
    sig = sig * np.exp(poly) * mat["scale"]
    sigma = mat["marrow"] * mat["scale"] / settings.mr_snr
    n1 = rng.normal(0.0, sigma, shape)
    n2 = rng.normal(0.0, sigma, shape)
    mr = np.sqrt((sig + n1) ** 2 + n2 ** 2)
    mr = np.round(mr, 1).astype(np.float32)
    tissue = r["tissue"].reshape(shape)
    images = {"mr": _image(mr, grid, np.float32), "mr_bones": _image(bone_labels(tissue), grid, np.uint8),
              "mr_rois": _image(r["roi"].reshape(shape), grid, np.uint8),
              "mr_tissues": _image(tissue, grid, np.uint8)}
    info = {"grid": grid, "noise_sigma": sigma, "bvf_mean_trabecular": float(r["bvf"][r["Tr"] > 0.99].mean())}
    return images, info


def simulate_ct(model, settings, grid, mapped_pts, J, rng) -> tuple[dict, dict]:
    """The CT image (int16 HU) and CT-space label volumes (nearest-neighbour truth)."""
    shape = tuple(grid["size"][::-1])
    r = render(model, mapped_pts, grid["spacing"], settings.ct_subsample_mm, J=J)
    mat = model.p["materials"]["ct"]
    lut = np.full(256, mat["air"])
    for tissue, code in TISSUES.items():
        key = {"skin": "skin", "fat": "fat", "muscle": "muscle", "fluid": "fluid", "meniscus": "meniscus",
               "femoral_cartilage": "cartilage", "tibial_cartilage": "cartilage",
               "patellar_cartilage": "cartilage"}.get(tissue)
        if key:
            lut[code] = mat[key]
    B, Tr, bvf = r["B"].astype(np.float64), r["Tr"].astype(np.float64), r["bvf"].astype(np.float64)
    hu = ((1.0 - B) * lut[r["soft"]] + (B - Tr) * mat["bone"]
          + Tr * (bvf * mat["bone"] + (1.0 - bvf) * mat["marrow"])).reshape(shape)
    sig = [f / 2.3548 / s for f, s in zip(settings.ct_psf_fwhm_mm[::-1], grid["spacing"][::-1])]
    hu = ndimage.gaussian_filter(hu, sig, mode="nearest")
    noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), [0.6 * s for s in sig], mode="wrap")
    noise *= settings.ct_noise_hu / max(float(noise.std()), 1e-9)
    ct = np.clip(np.round(hu + noise), -1024, 3071).astype(np.int16)
    tissue = r["tissue"].reshape(shape)
    images = {"ct": _image(ct, grid, np.int16), "ct_bones": _image(bone_labels(tissue), grid, np.uint8),
              "ct_rois": _image(r["roi"].reshape(shape), grid, np.uint8),
              "ct_tissues": _image(tissue, grid, np.uint8)}
    return images, {"grid": grid}


__all__ = ["simulate_mr", "simulate_ct", "mr_grid", "grid_points", "render", "bone_labels"]
