"""SMI and degree of anisotropy (ctsma.morphometry.shape) on analytic shapes with known values.

Truth: SMI is 0 for plates, 3 for rods and 4 for spheres (Hildebrand & Rüegsegger 1997); DA = 1 − λmin/λmax of
the MIL fabric is 0 for an isotropic structure, 1 for parallel plates and for parallel rods, and 1 − 1/k² for an
isotropic structure stretched k-fold along one axis (the intercept density along v becomes ∝ |A⁻¹v|, a quadric
with eigenvalues in the ratio 1 : 1 : 1/k²). The tolerances are the measured faceting errors of a voxel mesh.
"""

import json
import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ctsma.morphometry import MorphometryWarning, measure, measure_binary
from ctsma.morphometry.shape import shape_parameters

ISO = (1.0, 1.0, 1.0)


def _grid(n, sp=ISO):
    z, y, x = (np.mgrid[:n, :n, :n] + 0.5) * np.asarray(sp, float)[:, None, None, None]
    c = n * np.asarray(sp, float) / 2
    return z - c[0], y - c[1], x - c[2]


@pytest.mark.parametrize("sp", [ISO, (1.25, 1.0, 0.8)])
def test_sphere_is_4_and_isotropic(sp):
    z, y, x = _grid(40, sp)
    r = shape_parameters(z ** 2 + y ** 2 + x ** 2 < 11.0 ** 2, np.ones(z.shape, bool), sp)
    assert r["SMI"] == pytest.approx(4.0, abs=0.1)          # radii 3.5-11 voxels: 3.91-4.02 measured
    assert r["DA"] < 0.05                                  # 0.011 isotropic, 0.031 anisotropic voxels


@pytest.mark.parametrize("radius", [2.5, 6.0])
def test_rod_is_3_and_fully_anisotropic_along_its_axis(radius):
    z, y, x = _grid(40)
    r = shape_parameters(y ** 2 + x ** 2 < radius ** 2, np.ones(z.shape, bool), ISO)   # along z, through the box
    assert r["SMI"] == pytest.approx(3.0, abs=0.2)         # radii 2-9 voxels: 2.84-3.03 measured
    assert r["DA"] > 0.98
    assert abs(r["DA.main_direction"][2]) > 0.99          # (x, y, z): the longest MIL runs along the rod


def test_plates_are_0_and_fully_anisotropic_also_when_oblique():
    z, y, x = _grid(48)
    roi = np.ones(z.shape, bool)
    axial = shape_parameters(np.floor(z) % 8 < 3, roi, ISO)
    assert axial["SMI"] == pytest.approx(0.0, abs=0.02) and axial["DA"] > 0.995
    assert abs(axial["DA.main_direction"][2]) < 0.05      # the longest MIL lies in the plates' plane
    n = np.array([0.3, 1.0, 0.1]) / np.linalg.norm([0.3, 1.0, 0.1])
    oblique = shape_parameters(np.abs((z * n[0] + y * n[1] + x * n[2]) % 8) < 3, roi, ISO)
    assert oblique["SMI"] == pytest.approx(0.0, abs=0.05) and oblique["DA"] > 0.98


def test_cut_faces_at_the_roi_boundary_are_not_surface():
    """Plates in a spherical ROI: meshing the bone *in* the ROI would add the sphere's cut faces (every normal
    direction, curved); the interface mesh keeps only the plates' faces."""
    z, y, x = _grid(48)
    r = shape_parameters(np.floor(z) % 8 < 3, z ** 2 + y ** 2 + x ** 2 < 20.0 ** 2, ISO)
    assert r["SMI"] == pytest.approx(0.0, abs=0.05) and r["DA"] > 0.99


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).normal(size=(80, 80, 80))


def test_isotropic_random_structure_has_low_da(noise):
    g = gaussian_filter(noise, 2.0, mode="wrap")
    r = shape_parameters(g > np.percentile(g, 70), np.ones(g.shape, bool), ISO)
    assert r["DA"] < 0.1                                  # 0.052 measured: a finite sample of the field
    assert 1.0 < r["SMI"] < 3.0                           # rod-like: a thresholded field at 30 % volume


def test_stretched_structure_reads_one_minus_one_over_k_squared(noise):
    g = gaussian_filter(noise, (4.0, 2.0, 2.0), mode="wrap")    # the isotropic field stretched 2x along z
    r = shape_parameters(g > np.percentile(g, 70), np.ones(g.shape, bool), ISO)
    assert r["DA"] == pytest.approx(1 - 1 / 2 ** 2, abs=0.08)   # 0.718 measured
    assert abs(r["DA.main_direction"][2]) > 0.95


def test_measure_adds_shape_on_request_and_nan_without_interface():
    z, y, x = _grid(24)
    rod = y ** 2 + x ** 2 < 4.0 ** 2
    assert "SMI" not in measure(rod, ISO)
    res = measure(rod, ISO, shape=True)
    assert res["SMI"] == pytest.approx(3.0, abs=0.2) and res["DA"] > 0.95
    with pytest.warns(MorphometryWarning, match="SMI and DA are undefined"):
        inside = measure_binary(rod, ISO, mask=y ** 2 + x ** 2 < 2.0 ** 2, shape=True)   # all bone: no interface
    assert np.isnan(inside["SMI"]) and np.isnan(inside["DA"]) and inside["DA.main_direction"] is None


@pytest.mark.parametrize("shift", [0, 1])
def test_roi_without_marrow_or_without_bone_is_nan_whatever_lies_beside_it(shift):
    """Only the interface inside the ROI counts: bone that touches an empty ROI from outside, or marrow that
    touches an all-bone ROI from outside, gives no SMI or DA (for either voxel parity of the boundary)."""
    z, y, x = _grid(24)
    bone = np.zeros(z.shape, bool)
    bone[:, :, 12 + shift:] = True
    empty = np.zeros(z.shape, bool)
    empty[4:20, 4:20, 4:12 + shift] = True                 # marrow only, bone right beside it
    full = np.zeros(z.shape, bool)
    full[4:20, 4:20, 12 + shift:20] = True                 # bone only, marrow right beside it
    for roi in (empty, full):
        r = shape_parameters(bone, roi, ISO)
        assert np.isnan(r["SMI"]) and np.isnan(r["DA"]) and r["DA.main_direction"] is None
    both = empty | full                                    # the interface inside: a plate's face, SMI 0, DA 1
    r = shape_parameters(bone, both, ISO)
    assert r["SMI"] == pytest.approx(0.0, abs=0.05) and r["DA"] > 0.99


def test_slabs_give_nan_shape_with_a_warning():
    z, y, x = _grid(24)
    with pytest.warns(MorphometryWarning, match="not computed in z-slabs"):
        res = measure_binary(y ** 2 + x ** 2 < 4.0 ** 2, ISO, slabs=6, shape=True)
    assert np.isnan(res["SMI"]) and np.isfinite(res["Tb.Th"])


def test_cli_shape_writes_smi_and_da(tmp_path):
    import SimpleITK as sitk

    from ctsma.cli.main import main

    z, y, x = _grid(24)
    img = sitk.GetImageFromArray((y ** 2 + x ** 2 < 4.0 ** 2).astype(np.uint8))
    sitk.WriteImage(img, str(tmp_path / "rod.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--quiet", "morphometry", str(tmp_path / "rod.nii.gz"), "--out", str(tmp_path / "o"),
                     "--shape", "--threads", "1"]) == 0
    res = json.loads((tmp_path / "o" / "morphometry.json").read_text())
    assert res["SMI"] == pytest.approx(3.0, abs=0.2) and res["DA"] > 0.95 and len(res["DA.main_direction"]) == 3
