"""CT in-plane sharpness from the air/body edge, through-plane sharpness from the slices, exact Gaussian blur, and
matching a CT to a model's training CTs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import special

from ctsma.harmonise import (FWHM_PER_SIGMA, blurred_crop, gaussian_blur, inplane_edge_sigma, inplane_target,
                             interpolation_variance, matching_blur, slice_thickness, through_plane_blur,
                             through_plane_sigma, training_reference)
from ctsma.inference.engine import ct_resolution
from dicom_series import write_ct_series


def leg(sigma_mm: float, spacing=(0.6, 0.6, 1.0), noise_hu=20.0, seed=0, radius=45.0) -> sitk.Image:
    """A body cylinder (40 HU) along z in air (-1000 HU) whose boundary is a Gaussian-blurred step of ``sigma_mm``
    (the error function, point-sampled at the voxel centres), with white noise."""
    n = (int(150 / spacing[0]), int(150 / spacing[1]), 24)
    x = (np.arange(n[0]) - n[0] / 2 + 0.31) * spacing[0]
    y = (np.arange(n[1]) - n[1] / 2 + 0.17) * spacing[1]
    r = np.hypot(x[None, :], y[:, None])                  # a round section: edges at every angle
    body = 0.5 * (1 + special.erf((radius - r) / (math.sqrt(2) * sigma_mm)))
    arr = -1000.0 + 1040.0 * body
    arr = np.repeat(arr[None], n[2], 0) + np.random.default_rng(seed).normal(0, noise_hu, (n[2], n[1], n[0]))
    img = sitk.GetImageFromArray(np.round(arr).astype(np.int16))
    img.SetSpacing(spacing)
    return img


@pytest.mark.parametrize("sigma", [0.3, 0.45, 0.7])
@pytest.mark.parametrize("spacing", [(0.6, 0.6, 1.0), (0.4, 0.5, 0.7)])
def test_edge_sigma_of_an_analytic_blurred_body(sigma, spacing):
    est = inplane_edge_sigma(leg(sigma, spacing))
    assert est is not None and est["n_edges"] >= 500
    assert est["sigma_mm"] == pytest.approx(sigma, rel=0.05)
    assert est["sigma_x_mm"] == pytest.approx(est["sigma_y_mm"], rel=0.08)


def test_blur_adds_in_quadrature_and_is_an_exact_gaussian():
    img = leg(0.35)
    arr = sitk.GetArrayFromImage(img)
    e0 = inplane_edge_sigma(img)["sigma_mm"]
    for b in (0.2, 0.4):
        out = sitk.GetImageFromArray(np.round(gaussian_blur(arr, img.GetSpacing()[:2], b)).astype(np.int16))
        out.CopyInformation(img)
        assert inplane_edge_sigma(out)["sigma_mm"] == pytest.approx(math.hypot(e0, b), rel=0.04)
    # an impulse becomes a Gaussian of the asked variance along x and y, none along z; the sum is kept
    imp = np.zeros((5, 41, 41), np.float32)
    imp[2, 20, 20] = 1.0
    g = gaussian_blur(imp, (0.5, 0.4), 1.2)
    assert g.sum() == pytest.approx(1.0, abs=1e-5) and np.all(g[[0, 1, 3, 4]] == 0)
    xs, ys = (np.arange(41) - 20) * 0.5, (np.arange(41) - 20) * 0.4
    assert (g[2].sum(0) * xs ** 2).sum() == pytest.approx(1.2 ** 2, rel=1e-3)
    assert (g[2].sum(1) * ys ** 2).sum() == pytest.approx(1.2 ** 2, rel=1e-3)
    # nothing wraps around: a step stays a step away from it, at the borders too (within the ringing of a
    # Gaussian transfer function cut at the Nyquist frequency: under 1 % of the step)
    step = np.zeros((1, 8, 60), np.float32)
    step[..., 30:] = 100.0
    s = gaussian_blur(step, (0.5, 0.5), 0.5)
    assert np.allclose(s[..., :25], 0, atol=1.0) and np.allclose(s[..., -25:], 100, atol=1.0)
    assert s[0, 0, 29] == pytest.approx(100 * 0.5 * (1 + special.erf(-0.25 / (math.sqrt(2) * 0.5))), abs=2)
    assert np.array_equal(gaussian_blur(arr[:2], (0.6, 0.6), 0.0), arr[:2].astype(np.float32))
    # along z: the same exact Gaussian, at the slice spacing, and nothing in-plane
    imp = np.zeros((41, 5, 5), np.float32)
    imp[20, 2, 2] = 1.0
    g = gaussian_blur(imp, (0.5, 0.5, 0.7), 0.0, 1.5)
    zs = (np.arange(41) - 20) * 0.7
    assert g.sum() == pytest.approx(1.0, abs=1e-5) and np.all(g[:, [0, 1, 3, 4]] == 0)
    assert (g[:, 2, 2] * zs ** 2).sum() == pytest.approx(1.5 ** 2, rel=1e-3)


def test_padding_outside_the_reconstruction_circle_is_not_an_edge():
    """Scanners write -3024 (or -2048) outside the reconstruction circle; where that circle cuts the body, the cut
    is not the air/body edge and must not count (it would read 0.27 mm for this 0.45-mm edge)."""
    img = leg(0.45)
    a = sitk.GetArrayFromImage(img)
    sp = img.GetSpacing()
    x = (np.arange(a.shape[2]) - a.shape[2] / 2 + 0.31) * sp[0]
    y = (np.arange(a.shape[1]) - a.shape[1] / 2 + 0.17) * sp[1]
    a[:, np.hypot(x[None, :] + 35.0, y[:, None]) > 70.0] = -3024     # a circle that cuts the body on one side
    padded = sitk.GetImageFromArray(a)
    padded.CopyInformation(img)
    est = inplane_edge_sigma(padded)
    assert est["sigma_mm"] == pytest.approx(0.45, rel=0.05) and est["sigma_x_mm"] == pytest.approx(0.45, rel=0.05)


def test_no_air_edge_gives_none():
    inside = sitk.GetImageFromArray(np.random.default_rng(0).normal(40, 20, (10, 80, 80)).astype(np.int16))
    assert inplane_edge_sigma(inside) is None


@pytest.mark.parametrize("sigma", [0.12, 0.25])
def test_matching_blur_brings_the_edge_to_the_reference(sigma):
    ct = leg(sigma)
    m = matching_blur(ct, 0.40)
    assert m["sigma_mm"] == pytest.approx(sigma, rel=0.1) and m["sigma_after_mm"] == pytest.approx(0.40, abs=0.006)
    assert m["blur_mm"] == pytest.approx(math.sqrt(0.40 ** 2 - sigma ** 2), rel=0.05)
    # the whole CT blurred by it measures as the reference too
    out = sitk.GetImageFromArray(gaussian_blur(sitk.GetArrayViewFromImage(ct), ct.GetSpacing()[:2], m["blur_mm"]))
    out.CopyInformation(ct)
    assert inplane_edge_sigma(out)["sigma_mm"] == pytest.approx(0.40, abs=0.01)


def test_matching_blur_leaves_close_softer_or_unmeasurable_cts_alone():
    ct = leg(0.39)
    assert matching_blur(ct, 0.40)["blur_mm"] == 0.0                     # within the tolerance
    assert matching_blur(ct, 0.30)["blur_mm"] == 0.0                     # softer: cannot be sharpened
    inside = sitk.GetImageFromArray(np.random.default_rng(0).normal(40, 20, (10, 80, 80)).astype(np.int16))
    m = matching_blur(inside, 0.40)
    assert m["blur_mm"] == 0.0 and m["sigma_mm"] is None


def test_linear_interpolation_variance_and_the_inplane_target():
    # 16 samples 0.5 mm apart around a voxel centre: on 0.5-mm voxels every sample is half-way (u = 1/2), on 1-mm
    # voxels a quarter of the way (u = 1/4, 3/4), on 0.25-mm voxels on a voxel; variance u (1 - u) h^2
    assert interpolation_variance(0.5) == pytest.approx(0.25 * 0.25)
    assert interpolation_variance(1.0) == pytest.approx(0.1875)
    assert interpolation_variance(0.25) == pytest.approx(0.0, abs=1e-12)
    # where positions spread evenly, about the uniform average h^2 / 6
    for h in (0.6, 0.7, 0.9):
        assert interpolation_variance(h) == pytest.approx(h ** 2 / 6, rel=0.1)
    # the same kernel as SimpleITK's linear resampling, which cuts the patches: a unit impulse resampled onto the
    # patch's samples spreads over them with exactly this variance (summed over the impulse's positions)
    h, step, n = 0.7, 0.5, 16
    var = []
    for k in range(40):
        line = np.zeros(40, np.float32)
        line[k] = 1.0
        img = sitk.GetImageFromArray(line[None, None, :])
        img.SetSpacing((h, 1.0, 1.0))
        centre = 20 * h
        ref = sitk.Image(n, 1, 1, sitk.sitkFloat32)
        ref.SetSpacing((step, 1.0, 1.0))
        ref.SetOrigin((centre - (n / 2 - 0.5) * step, 0.0, 0.0))
        w = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear))[0, 0]
        pos = ref.GetOrigin()[0] + step * np.arange(n)
        var.append(w * (pos - k * h) ** 2)
    assert np.sum(var) / n == pytest.approx(interpolation_variance(h), rel=1e-4)
    # finer pixels than the training CTs' interpolate less, so they are matched to a softer edge
    assert inplane_target(0.3, 0.6, 0.4) == pytest.approx(
        math.sqrt(0.09 + interpolation_variance(0.6) - interpolation_variance(0.4)))
    assert inplane_target(0.3, 0.6, 0.6) == pytest.approx(0.3)
    assert inplane_target(0.3, 0.6, 0.4) > 0.3 > inplane_target(0.3, 0.6, 0.8)
    assert inplane_target(0.3, None, 0.4) == 0.3                  # older model files: the edge sigma alone
    assert inplane_target(0.3, 0.6, 1.5) is None                  # 1.5-mm pixels alone blur more than that


def test_through_plane_sigma_and_matching_blur():
    # nominal thickness = FWHM of the slice profile, plus linear interpolation between the slices
    assert through_plane_sigma(1.0, 1.0) == pytest.approx(math.sqrt((1 / FWHM_PER_SIGMA) ** 2 + 0.1875))
    assert FWHM_PER_SIGMA == pytest.approx(2.3548, abs=1e-4)
    own, ref = through_plane_sigma(0.7, 0.7), through_plane_sigma(1.0, 1.0)
    assert through_plane_blur(own, ref) == pytest.approx(math.sqrt(ref ** 2 - own ** 2))
    assert 0.4 < through_plane_blur(own, ref) < 0.5
    assert through_plane_blur(ref, ref) == 0.0                    # the same slices
    assert through_plane_blur(through_plane_sigma(1.5, 1.5), ref) == 0.0   # thicker: cannot be sharpened
    assert through_plane_sigma(1.0, 0.5) < ref                    # overlapping slices: less interpolation blur


def test_slice_thickness_from_dicom_or_spacing(tmp_path):
    from ctsma.errors import InputImageError
    from ctsma.io.images import read_image

    img = leg(0.4, spacing=(0.6, 0.6, 0.8))
    assert slice_thickness(img) == (pytest.approx(0.8), "slice spacing")
    img.SetMetaData("0018|0050", "1.25 ")
    assert slice_thickness(img) == (pytest.approx(1.25), "DICOM SliceThickness")
    img.SetMetaData("0018|0050", "n/a")                            # unreadable: the spacing
    assert slice_thickness(img)[1] == "slice spacing"
    # a DICOM series whose slices are 0.8 mm apart and 1.5 mm thick (overlapping reconstruction)
    write_ct_series(leg(0.4, spacing=(0.6, 0.6, 0.8))[60:190, 60:190, :6], tmp_path, thickness_mm=1.5)
    ct = read_image(tmp_path, what="CT")
    assert ct.GetSpacing()[2] == pytest.approx(0.8, abs=1e-3)
    assert slice_thickness(ct) == (pytest.approx(1.5), "DICOM SliceThickness")
    # a series with a slice missing is refused (ITK would read it as evenly spaced, every structure misplaced)
    (tmp_path / "s002.dcm").unlink()
    with pytest.raises(InputImageError, match="missing, duplicated or unevenly spaced"):
        read_image(tmp_path, what="CT")


def test_training_reference_from_the_store_attributes():
    info = {f"k{i}": {"ct_resolution": {"inplane_edge_sigma_mm": s, "spacing_mm": [0.6, 0.6, dz]}}
            for i, (s, dz) in enumerate([(0.36, 1.0), (0.38, 1.0), (0.40, 1.25), (None, 1.0)])}
    info["k1"]["ct_resolution"]["slice_thickness_mm"] = 2.0      # k1 records one; the others (older) use their spacing
    ref = training_reference(json.dumps(info), ["k0", "k1", "k2", "k3", "unknown"])
    assert ref["inplane_edge_sigma_mm"] == pytest.approx(0.38) and ref["n_ct"] == 3
    assert ref["inplane_edge_sigma_range_mm"] == pytest.approx([0.36, 0.40]) and ref["slice_spacing_mm"] == 1.0
    assert ref["slice_thickness_mm"] == pytest.approx(1.125)       # median of 1.0, 2.0, 1.25, 1.0
    assert ref["inplane_spacing_mm"] == pytest.approx(0.6)
    assert training_reference(info, ["k0"])["inplane_edge_sigma_mm"] == pytest.approx(0.36)
    assert training_reference({}, ["k0"]) is None and training_reference(None, ["k0"]) is None


def _meta(sigma, dz=1.0, **more):
    return {"input": {"ct_reference": {"inplane_edge_sigma_mm": sigma, "slice_spacing_mm": dz, **more}}}


def test_ct_resolution_decides_blur_and_warnings():
    ct = leg(0.25)
    est = inplane_edge_sigma(ct)["sigma_mm"]
    info, warns = ct_resolution(ct, _meta(0.40))                 # sharper than the training CTs: matched
    assert info["harmonisation_blur_mm"] == pytest.approx(math.sqrt(0.4 ** 2 - est ** 2), abs=1e-4) and not warns
    info, warns = ct_resolution(ct, _meta(0.40), harmonise=False)
    assert info["harmonisation_blur_mm"] == 0 and len(warns) == 1 and "sharper" in warns[0]
    info, warns = ct_resolution(ct, _meta(0.18))                 # softer: a warning, no blur
    assert info["harmonisation_blur_mm"] == 0 and len(warns) == 1 and "softer" in warns[0]
    info, warns = ct_resolution(ct, _meta(est, dz=2.0))          # thinner slices: blurred along z to match
    assert info["harmonisation_blur_mm"] == 0 and not warns
    assert info["through_plane_blur_mm"] == pytest.approx(
        through_plane_blur(through_plane_sigma(1.0, 1.0), through_plane_sigma(2.0, 2.0)), abs=1e-4)
    assert info["slice_thickness_source"] == "slice spacing" and info["model_slice_thickness_mm"] == 2.0
    info, warns = ct_resolution(ct, _meta(est, dz=2.0), harmonise=False)
    assert info["through_plane_blur_mm"] == 0 and len(warns) == 1 and "thinner" in warns[0]
    info, warns = ct_resolution(ct, _meta(est, dz=0.5))          # thicker slices: a warning, no blur
    assert info["through_plane_blur_mm"] == 0 and len(warns) == 1 and "thicker" in warns[0]
    info, warns = ct_resolution(ct, _meta(est, dz=1.1))          # slightly thinner: matched, no warning
    assert not warns
    assert info["through_plane_blur_mm"] == pytest.approx(
        through_plane_blur(through_plane_sigma(1.0, 1.0), through_plane_sigma(1.1, 1.1)), abs=1e-4)
    # a thickness the caller knows (a NIfTI from DICOM): 2-mm slices 1 mm apart are as soft as the training CTs'
    info, warns = ct_resolution(ct, _meta(est, dz=2.0), slice_thickness_mm=2.0)
    assert info["slice_thickness_source"] == "given" and info["through_plane_blur_mm"] > 0   # less interpolation
    assert info["through_plane_sigma_mm"] == pytest.approx(through_plane_sigma(2.0, 1.0), abs=1e-4)
    # slices that are not axial (a sagittal acquisition): nothing is matched, with a warning
    sag = sitk.Image(ct)
    sag.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    info, warns = ct_resolution(sag, _meta(0.40, dz=2.0))
    assert info["harmonisation_blur_mm"] == info["through_plane_blur_mm"] == 0
    assert len(warns) == 1 and "not axial" in warns[0]
    # training CTs with coarser pixels (0.8 against 0.6 mm): their patches are softer, so this CT is blurred more
    info, warns = ct_resolution(ct, _meta(0.40, inplane_spacing_mm=0.8))
    target = math.sqrt(0.4 ** 2 + interpolation_variance(0.8) - interpolation_variance(0.6))
    assert info["target_inplane_edge_sigma_mm"] == pytest.approx(target, abs=1e-4) and not warns
    assert info["harmonisation_blur_mm"] == pytest.approx(math.sqrt(target ** 2 - est ** 2), abs=1e-4)
    # pixels so coarse that no kernel could match (training CTs: 0.2-mm pixels, edge sigma 0.1 mm): a warning
    info, warns = ct_resolution(ct, _meta(0.10, inplane_spacing_mm=0.2))
    assert info["target_inplane_edge_sigma_mm"] is None and info["harmonisation_blur_mm"] == 0
    assert len(warns) == 1 and "too coarse" in warns[0]
    info, warns = ct_resolution(ct, {"input": {}})               # an older model: used as it is, said so
    assert info["harmonisation_blur_mm"] == 0 and not warns and "no training-CT resolution" in info["note"]
    assert info["inplane_edge_sigma_mm"] == pytest.approx(est, abs=1e-4)


@pytest.mark.parametrize("blur_z", [0.0, 1.5])
def test_the_harmonised_crop_equals_the_whole_ct_blurred_where_patches_are_cut(blur_z):
    ct = leg(0.25)
    rois = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    rois[10:14, 100:130, 110:140] = 1
    sub = blurred_crop(ct, rois, 8.0, 0.3, blur_z)
    whole = gaussian_blur(sitk.GetArrayViewFromImage(ct), ct.GetSpacing(), 0.3, blur_z)
    lo = np.rint(ct.TransformPhysicalPointToContinuousIndex(sub.GetOrigin())).astype(int)[::-1]
    a = sitk.GetArrayViewFromImage(sub)
    # the part within half a patch (4 mm) of the ROIs
    inner = (slice(max(10 - 4, 0) - lo[0], 14 + 4 - lo[0]),
             slice(100 - 7 - lo[1], 130 + 7 - lo[1]), slice(110 - 7 - lo[2], 140 + 7 - lo[2]))
    full = whole[lo[0]:lo[0] + a.shape[0], lo[1]:lo[1] + a.shape[1], lo[2]:lo[2] + a.shape[2]]
    # equal but for the far tail of the band-limited kernel (the crop's edges are padded, the whole CT's are not):
    # well under the 20-HU noise
    np.testing.assert_allclose(a[inner], full[inner], atol=0.5)
    assert np.abs(a[inner] - full[inner]).mean() < 0.1


def test_only_a_ct_model_file_carries_the_reference():
    from ctsma.models.export import build_meta
    from ctsma.models.networks import PatchRegressor

    net = PatchRegressor(1, 16, widths=(4, 8, 8, 8), head_hidden=8)
    ref = {"inplane_edge_sigma_mm": 0.31, "slice_spacing_mm": 1.0}
    kw = dict(spacing_mm=0.5, extent_mm=8.0, masks=False, intensity_offset=0.0, intensity_scale=1.0, target="mr",
              y_mean=np.zeros(4), y_sd=np.ones(4), training={}, metrics={}, ct_reference=ref)
    assert build_meta("student_distilled", net, modality="ct", **kw)["input"]["ct_reference"] == ref
    assert "ct_reference" not in build_meta("teacher", net, modality="mr", **kw)["input"]
