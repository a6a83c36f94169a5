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


def _cylinder(tissue_hu, width_mm, *, inner=500.0, outer=40.0, noise=22.0, seed=0, radius=15.0, n=84, nz=12,
              air=False):
    """A CT of a bone cylinder (axis z, cut by the field of view at both ends) with a cortical shell of
    ``width_mm`` and ``tissue_hu``: partial volume on a 0.1 mm grid, a Gaussian PSF, 0.5 mm voxels, correlated
    noise. With ``air`` the soft tissue is a disc in air (an air/body edge). Returns (ct, bones)."""
    f = 5
    h = VOXEL_MM / f
    y, x = (np.mgrid[0:n * f, 0:n * f] + 0.5) * h - n * VOXEL_MM / 2
    r = np.hypot(y, x)
    img = np.where(r > radius, outer, np.where(r > radius - width_mm, tissue_hu, inner))
    if air:
        img = np.where(r > radius + 4.0, -1000.0, img)
    img = ndi.gaussian_filter(img, PSF_MM / h).reshape(n, f, n, f).mean((1, 3))
    rng = np.random.default_rng(seed)
    vol = np.repeat(img[None], nz, 0)
    grain = ndi.gaussian_filter(rng.normal(size=vol.shape), [0, 0.6 * PSF_MM / VOXEL_MM, 0.6 * PSF_MM / VOXEL_MM])
    vol = vol + noise * grain / grain.std()
    yc, xc = (np.mgrid[0:n, 0:n] + 0.5) * VOXEL_MM - n * VOXEL_MM / 2
    lab = np.repeat((np.hypot(yc, xc) <= radius)[None], nz, 0).astype(np.uint8)
    ct, bones = sitk.GetImageFromArray(vol.astype(np.float32)), sitk.GetImageFromArray(lab)
    for im in (ct, bones):
        im.SetSpacing((VOXEL_MM, VOXEL_MM, 0.8))
    return ct, bones


# the image's blur: the PSF and the voxel's box (partial volume), which add in quadrature
SIGMA = math.hypot(PSF_MM, VOXEL_MM / math.sqrt(12))


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
    assert out["tissue_hu"] == pytest.approx(tissue, abs=30.0)
    assert out["width_mm"] == pytest.approx(width, abs=0.03)
    assert out["inner_hu"] == pytest.approx(500.0, abs=5.0)
    assert out["outer_hu"] == pytest.approx(40.0, abs=5.0)
    assert out["n_profiles"] > 1000


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
    with pytest.raises(InputImageError, match="grid"):
        cortical_shell(ct, bones[:, :, :5], {"femur": 1}, psf_sigma_mm=SIGMA)
    out = cortical_shell(ct, bones, {"femur": 1, "tibia": 2}, psf_sigma_mm=SIGMA)
    assert out["tibia"]["n_profiles"] == 0 and math.isnan(out["tibia"]["tissue_hu"])
