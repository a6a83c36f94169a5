"""A knee's cortical shell from its CT: blurred-slab fit (``ctsma.inference.cortex``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from ctsma.errors import InputImageError
from ctsma.inference.cortex import _model, cortical_shell, fit_profile

PSF_MM = 0.38
VOXEL_MM = 0.5
SLICE_MM = 0.8


def _cylinder(tissue_hu, width_mm, *, inner=500.0, outer=40.0, noise=22.0, seed=0, radius=15.0, n=84, nz=12,
              voxel=(VOXEL_MM, VOXEL_MM), centre_x=0.0, cap=None, air=False):
    """A CT of a bone cylinder (axis z) with a cortical shell of ``width_mm`` and ``tissue_hu``, rendered with
    partial volume on a 5x finer grid, a Gaussian PSF, (y, x) pixels ``voxel`` mm and correlated noise. The
    cylinder is cut by the field of view at both z ends, and at its x edge when ``centre_x`` moves it there. With
    ``cap`` (a slice index) it ends inside the field of view instead: below that slice soft tissue, a cortical
    plate on the end face, and a blur three times wider along z. With ``air`` the soft tissue is a disc in air
    (an air/body edge). Returns (ct, bones)."""
    f = 5
    hy, hx = voxel[0] / f, voxel[1] / f
    y = (np.arange(n * f) + 0.5) * hy - n * voxel[0] / 2
    x = (np.arange(n * f) + 0.5) * hx - n * voxel[1] / 2 - centre_x
    r = np.hypot(*np.meshgrid(y, x, indexing="ij"))
    img = np.where(r > radius, outer, np.where(r > radius - width_mm, tissue_hu, inner))
    if air:
        img = np.where(r > radius + 4.0, -1000.0, img)
    img = ndi.gaussian_filter(img, (PSF_MM / hy, PSF_MM / hx)).reshape(n, f, n, f).mean((1, 3))
    vol = np.repeat(img[None], nz, 0)
    yc = (np.arange(n) + 0.5) * voxel[0] - n * voxel[0] / 2
    xc = (np.arange(n) + 0.5) * voxel[1] - n * voxel[1] / 2 - centre_x
    lab = np.repeat((np.hypot(*np.meshgrid(yc, xc, indexing="ij")) <= radius)[None], nz, 0).astype(np.uint8)
    if cap is not None:
        zf = (np.arange(nz * f) + 0.5) * SLICE_MM / f  # a fine z grid, the end face at cap slices' bottom edge
        face = cap * SLICE_MM
        inside = (r <= radius)[None]
        level = np.where(zf[:, None, None] < face, outer,
                         np.where(zf[:, None, None] < face + width_mm, np.where(inside, tissue_hu, outer), np.nan))
        fine = np.where(np.isnan(level), np.repeat(np.where(r > radius, outer, np.where(
            r > radius - width_mm, tissue_hu, inner))[None], nz * f, 0), level)
        fine = ndi.gaussian_filter(fine, (3 * PSF_MM * f / SLICE_MM, PSF_MM / hy, PSF_MM / hx))
        vol = fine.reshape(nz, f, n, f, n, f).mean((1, 3, 5))
        lab[:cap] = 0
    rng = np.random.default_rng(seed)
    grain = ndi.gaussian_filter(rng.normal(size=vol.shape), [0, 0.6 * PSF_MM / voxel[0], 0.6 * PSF_MM / voxel[1]])
    vol = vol + noise * grain / grain.std()
    ct, bones = sitk.GetImageFromArray(vol.astype(np.float32)), sitk.GetImageFromArray(lab)
    for im in (ct, bones):
        im.SetSpacing((voxel[1], voxel[0], SLICE_MM))
    return ct, bones


def _sigma(voxel=(VOXEL_MM, VOXEL_MM)):
    """The image's in-plane blur: the PSF and the pixel's box (partial volume, h^2 / 12 along an axis; the mean
    over directions for anisotropic pixels), which add in quadrature."""
    return math.sqrt(PSF_MM ** 2 + (voxel[0] ** 2 + voxel[1] ** 2) / 24)


SIGMA = _sigma()


def test_fit_recovers_an_analytic_profile():
    u = np.arange(-2.5, 2.5001, 0.05)
    truth = {"outer_hu": 30.0, "inner_hu": 450.0, "tissue_hu": 1800.0, "width_mm": 0.8}
    m = _model([truth["outer_hu"], truth["inner_hu"], truth["tissue_hu"], truth["width_mm"], 0.3], u, 0.4)
    m[:3] = np.nan  # empty bins are skipped
    fit = fit_profile(u, m, 0.4)
    for k, v in truth.items():
        assert fit[k] == pytest.approx(v, rel=1e-4)


@pytest.mark.parametrize("tissue, width", [(1750.0, 0.9), (1850.0, 0.9), (1750.0, 0.7), (1650.0, 1.1)])
def test_cylinder_shell_is_recovered(tissue, width):
    """Tissue HU and width, which the cortical peak alone confounds, are both recovered on a cylinder cut by the
    field of view (its cut faces are not surface)."""
    ct, bones = _cylinder(tissue, width)
    out = cortical_shell(ct, bones, {"femur": 1}, psf_sigma_mm=SIGMA)["femur"]
    assert out["tissue_hu"] == pytest.approx(tissue, abs=15.0)
    assert out["width_mm"] == pytest.approx(width, abs=0.02)
    assert out["inner_hu"] == pytest.approx(500.0, abs=5.0)
    assert out["outer_hu"] == pytest.approx(40.0, abs=5.0)
    assert out["n_profiles"] > 1000


@pytest.mark.parametrize("case", ["anisotropic pixels", "cut by the image's edge", "capped in the field of view"])
def test_shell_is_recovered_on_other_geometries(case):
    kw = {"anisotropic pixels": {"voxel": (0.4, 0.6)}, "cut by the image's edge": {"centre_x": -12.0},
          "capped in the field of view": {"cap": 4, "nz": 20}}[case]
    ct, bones = _cylinder(1750.0, 0.9, **kw)
    out = cortical_shell(ct, bones, {"femur": 1}, psf_sigma_mm=_sigma(kw.get("voxel", (VOXEL_MM, VOXEL_MM))))
    assert out["femur"]["tissue_hu"] == pytest.approx(1750.0, abs=15.0)
    assert out["femur"]["width_mm"] == pytest.approx(0.9, abs=0.02)


def test_peak_alone_confounds_what_the_fit_separates():
    """A thinner shell of denser tissue peaks lower than a thicker one of lighter tissue; the fit orders them."""
    dense_thin = cortical_shell(*_cylinder(1850.0, 0.7), {"b": 1}, psf_sigma_mm=SIGMA)["b"]
    light_thick = cortical_shell(*_cylinder(1650.0, 1.1), {"b": 1}, psf_sigma_mm=SIGMA)["b"]
    assert dense_thin["peak_hu"] < light_thick["peak_hu"]
    assert dense_thin["tissue_hu"] > light_thick["tissue_hu"] + 150


def test_blur_is_measured_from_the_air_edge_by_default():
    ct, bones = _cylinder(1750.0, 0.9, air=True, n=96)
    out = cortical_shell(ct, bones, {"femur": 1})
    assert out["sigma_mm"] == pytest.approx(SIGMA, rel=0.1)
    assert out["femur"]["tissue_hu"] == pytest.approx(1750.0, rel=0.1)


def test_bad_inputs():
    ct, bones = _cylinder(1750.0, 0.9)
    with pytest.raises(InputImageError, match="air/body edges"):
        cortical_shell(ct, bones, {"femur": 1})  # no air in the field of view
    with pytest.raises(InputImageError, match="does not match the geometry"):
        cortical_shell(ct, bones[:, :, :5], {"femur": 1}, psf_sigma_mm=SIGMA)
    out = cortical_shell(ct, bones, {"femur": 1, "tibia": 2}, psf_sigma_mm=SIGMA)
    assert out["tibia"]["n_profiles"] == 0 and math.isnan(out["tibia"]["tissue_hu"])
