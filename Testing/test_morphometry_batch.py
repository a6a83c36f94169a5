"""Batch morphometry: the compiled two-phase kernel against the edt package and the one-image path."""

import importlib.metadata
import warnings
from pathlib import Path

import edt
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctsma.morphometry import MorphometryWarning, local_thickness, measure_batch
from ctsma.morphometry.distance import edtsq_labels

EDT_VERSION = importlib.metadata.version("edt")
SPACINGS = [(1.0, 1.0, 1.0), (0.3, 0.3, 0.3), (0.7, 0.4, 0.25), (0.125, 0.333, 0.5)]


def _field(rng, shape, sigma, fraction):
    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return f > np.quantile(f, fraction)


@pytest.mark.parametrize("seed", range(6))
def test_label_distance_transform_is_edt_bit_for_bit(seed):
    """Random shapes (down to one voxel thick), spacings, labels 0/1/2 and single-label images."""
    rng = np.random.default_rng(seed)
    for trial in range(8):
        shape = tuple(int(n) for n in rng.integers(1, 28, 3))
        sp = tuple(float(s) for s in rng.choice([0.125, 0.25, 0.3, 0.333, 0.4, 0.7, 1.0], 3))
        bone = _field(rng, shape, rng.uniform(0.5, 2.0), rng.uniform(0.1, 0.9))
        roi = rng.random(shape) > rng.choice([0.0, 0.05, 0.4])
        lab = ((bone & roi).astype(np.uint8) * 2 + (roi & ~bone).astype(np.uint8))
        if trial == 0:
            lab = bone.astype(np.uint8)  # one label and background
        if trial == 1:
            lab = np.ones(shape, np.uint8)  # one label everywhere: no boundary, inf
        if trial == 2:  # long runs (the windowed passes try offsets up to the column length) and a lone boundary
            shape = tuple(int(n) for n in rng.integers(40, 70, 3))
            lab = np.ones(shape, np.uint8)
            lab[tuple(int(rng.integers(0, n)) for n in shape)] = 2
        ours = edtsq_labels(lab, *sp)
        ref = edt.edtsq(lab, anisotropy=sp, black_border=False)
        assert ours.dtype == np.float32 and ours.shape == lab.shape
        if EDT_VERSION.startswith("3.1."):  # the arithmetic reproduced is that of edt 3.1
            np.testing.assert_array_equal(ours, ref, err_msg=f"shape {shape}, spacing {sp}")
        else:  # another edt release may round differently: the same distances to float32 precision
            np.testing.assert_allclose(ours, ref, rtol=1e-6, err_msg=f"shape {shape}, spacing {sp}")


def _one_patch(bone, roi, sp, convention):
    """The one-image path: each phase's local-thickness map on its own, spheres confined to the ROI."""
    b, m = bone & roi, roi & ~bone
    th = local_thickness(b, sp, convention)[b].mean(dtype=np.float64) if b.any() else np.nan
    sep = local_thickness(m, sp, convention)[m].mean(dtype=np.float64) if m.any() else np.nan
    return b.sum() / roi.sum(), th, sep


@pytest.mark.parametrize("sp", SPACINGS)
@pytest.mark.parametrize("convention", ["default", "bonej"])
def test_batch_kernel_matches_one_image_path_with_masks(sp, convention):
    rng = np.random.default_rng(11)
    p = np.stack([_field(rng, (24, 26, 22), 1.3, f) for f in (0.5, 0.75, 0.3, 0.6)])
    m = np.ones(p.shape, bool)
    m[1, :, :, :7] = False  # a cut ROI
    z, y, x = np.ogrid[:24, :26, :22]
    m[2] = (z - 12) ** 2 + (y - 13) ** 2 + (x - 11) ** 2 < 81  # a ball inside the patch
    out = measure_batch(p, sp, masks=m, convention=convention, workers=2)
    rel = 1e-12 if EDT_VERSION.startswith("3.1.") else 1e-3  # same distances bit for bit: same maps
    for i in range(len(p)):
        bvtv, th, sep = _one_patch(p[i], m[i], sp, convention)
        assert out["BV/TV"][i] == bvtv
        assert out["Tb.Th"][i] == pytest.approx(th, rel=rel)
        assert out["Tb.Sp"][i] == pytest.approx(sep, rel=rel)
        assert out["Tb.N"][i] == pytest.approx(1.0 / (th + sep), rel=rel)


def test_batch_threads_equal_one_thread_and_exact_method_agrees():
    rng = np.random.default_rng(5)
    p = np.stack([_field(rng, (20, 20, 20), 1.2, 0.7) for _ in range(5)])
    one = measure_batch(p, (0.3, 0.3, 0.3), workers=1)
    two = measure_batch(p, (0.3, 0.3, 0.3), workers=2)
    exact = measure_batch(p, (0.3, 0.3, 0.3), workers=2, method="exact")
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])
        np.testing.assert_allclose(one[k], exact[k], rtol=0.03)
    for k in ("Tb.Th", "Tb.Sp"):  # the fast method paints the reduced medial axis only: never above exact
        assert np.all(one[k] <= exact[k] * (1 + 1e-12))


def test_batch_degenerate_patches_give_nan_with_one_warning():
    p = np.zeros((5, 8, 8, 8), bool)
    m = np.ones(p.shape, bool)
    p[0] = True                     # all bone, no ROI cut: no boundary anywhere
    p[1, :4] = True
    m[1, 4:] = False                # the ROI is all bone, but bounded: Tb.Th defined, Tb.Sp not
    m[2] = False                    # empty ROI
    p[3, 2:5] = True                # ordinary
    # p[4]: all marrow
    with pytest.warns(MorphometryWarning, match="4 of 5 patches"):
        out = measure_batch(p, (0.5, 0.5, 0.5), masks=m)
    assert out["BV/TV"][0] == 1.0 and np.isnan(out["Tb.Th"][0]) and np.isnan(out["Tb.Sp"][0])
    assert out["BV/TV"][1] == 1.0 and out["Tb.Th"][1] > 0 and np.isnan(out["Tb.Sp"][1])
    assert np.isnan(out["BV/TV"][2]) and np.isnan(out["Tb.N"][2])
    assert out["Tb.Th"][3] == pytest.approx(1.5) and np.isfinite(out["Tb.N"][3])
    assert out["BV/TV"][4] == 0.0 and np.isnan(out["Tb.Th"][4]) and np.isnan(out["Tb.Sp"][4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_batch(p[3:4], (0.5, 0.5, 0.5))  # nothing undefined: no warning


def test_batch_on_real_bone_crop_matches_one_image_path():
    """Eight 36³ sub-cubes of the committed LHDL micro-CT crop (reference segmentation), isotropic 19.5 µm."""
    img = sitk.ReadImage(str(Path(__file__).parent / "data" / "lhdl_3155_D_4_bc_crop72_19.5um.nii.gz"))
    bone = ndimage.gaussian_filter(sitk.GetArrayFromImage(img).astype(np.float32), 1.0) > 63
    sp = tuple(img.GetSpacing())[::-1]
    p = np.stack([bone[z:z + 36, y:y + 36, x:x + 36] for z in (0, 36) for y in (0, 36) for x in (0, 36)])
    out = measure_batch(p, sp, workers=2)
    rel = 1e-12 if EDT_VERSION.startswith("3.1.") else 1e-3
    whole = np.ones(p.shape[1:], bool)
    for i in range(len(p)):
        bvtv, th, sep = _one_patch(p[i], whole, sp, "default")
        assert out["BV/TV"][i] == bvtv
        assert out["Tb.Th"][i] == pytest.approx(th, rel=rel) and out["Tb.Sp"][i] == pytest.approx(sep, rel=rel)
    assert 0.15 < np.mean(out["Tb.Th"]) < 0.4 and 0.3 < np.mean(out["Tb.Sp"]) < 1.0  # trabecular bone, in mm


def test_label_distance_transform_of_an_empty_image():
    for shape in ((3, 3, 0), (0, 3, 3), (3, 0, 3)):
        assert edtsq_labels(np.zeros(shape, np.uint8), 1.0, 1.0, 1.0).shape == shape
