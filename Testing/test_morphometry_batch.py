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
    # the default convention's reduced axis may keep a few balls that are no distance ridge (docs/morphometry.md)
    assert np.all(one["Tb.Th"] <= exact["Tb.Th"] * (1 + 1e-3))
    fast_b = measure_batch(p, (0.3, 0.3, 0.3), workers=1, convention="bonej")
    exact_b = measure_batch(p, (0.3, 0.3, 0.3), workers=1, convention="bonej", method="exact")
    for k in ("Tb.Th", "Tb.Sp"):  # BoneJ's rule: the fast method paints a subset of the balls, never above exact
        assert np.all(fast_b[k] <= exact_b[k] * (1 + 1e-12))


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


@pytest.mark.parametrize("sp", [(0.3, 0.3, 0.3), (0.7, 0.4, 0.25)])
@pytest.mark.parametrize("sigma", [1.0, 4.0])  # thin structures (direct painter) and wide ones (block painter)
def test_painted_sum_is_the_maps_sum_bit_for_bit(sp, sigma):
    """paint_sum counts each row word's newly painted bits instead of writing a map: the same sum, exactly, as the
    map paint_serial paints, on labelled phases (other label and outside the ROI unpainted), rows wider than a
    bit word, for both painters."""
    from ctsma.morphometry.paint import _direct_tables, descending_order, paint_serial, paint_sum
    from ctsma.morphometry.power import reduced_axis
    from ctsma.morphometry.thickness import _values_at

    rng = np.random.default_rng(3)
    bone = _field(rng, (18, 40, 75), sigma, 0.6)
    roi = np.ones(bone.shape, bool)
    roi[:, :, :9] = False
    lab = ((bone & roi).astype(np.uint8) * 2 + (roi & ~bone).astype(np.uint8))
    d = edtsq_labels(lab, *sp)
    axis = reduced_axis(lab.shape, d.ravel(), lab.ravel() > 0, *sp)
    painters = set()
    for label in (2, 1):
        phase = lab == label
        own = np.where(phase, d, 0).astype(np.float32)
        idx = axis[lab.ravel()[axis] == label]
        val = _values_at(np.sqrt(own), idx, *sp, True)
        order = descending_order(val)
        ii, vv = idx[order], val[order]
        ref = paint_serial(phase, d.ravel(), ii, vv, *sp, 0, lab.shape[0])
        assert np.count_nonzero(ref) == phase.sum()  # every phase voxel painted
        assert paint_sum(lab, label, d.ravel(), ii, vv, *sp) == ref.astype(np.float64).sum(dtype=np.float64)
        d2 = d.ravel()[ii]
        rad = np.sqrt(d2.astype(np.float64)) * (1.0 - 1e-6)
        painters.add(bool(_direct_tables(d2, rad, int(phase.sum()), *sp)[1].shape[0]))  # the direct painter
    assert painters == ({True} if sigma == 1.0 else {False})  # wide structures: the block painter


def test_signed_distance_values_are_each_phases_own():
    """One signed map (marrow negative) read with the phase's sign gives the values of that phase's own map."""
    from ctsma.morphometry.batch import _labels, _signed_distances
    from ctsma.morphometry.thickness import _values_at, _values_signed

    rng = np.random.default_rng(8)
    bone = _field(rng, (20, 22, 25), 1.2, 0.7)
    roi = rng.random(bone.shape) > 0.05
    for sp in [(0.3, 0.3, 0.3), (0.5, 0.3, 0.4)]:
        lab, _, _ = _labels(bone, roi)
        d = edtsq_labels(lab, *sp)
        s = _signed_distances(lab, d)
        for label, sign in ((2, 1.0), (1, -1.0)):
            own = np.sqrt(np.where(lab == label, d, 0)).astype(np.float32)
            idx = np.flatnonzero(lab.ravel() == label)
            for default in (True, False):
                np.testing.assert_array_equal(_values_signed(s, idx, *sp, default, np.float32(sign)),
                                              _values_at(own, idx, *sp, default))


def test_descending_order_is_a_stable_sort_whatever_the_spread():
    """The radix sort sorts only the digits the values' spread needs: the stable descending order in every case
    (one pass, two, three for a spread over all float32, ties, one value, none)."""
    from ctsma.morphometry.paint import descending_order

    rng = np.random.default_rng(0)
    cases = [rng.uniform(0.3, 3.0, 3000), rng.uniform(1.0, 1.001, 500), np.round(rng.uniform(0, 4, 2000), 1),
             rng.uniform(-1e30, 1e30, 2000), np.full(50, 2.5), np.array([1.0]), np.zeros(0)]
    for v in cases:
        v = v.astype(np.float32)
        np.testing.assert_array_equal(descending_order(v), np.argsort(-v, kind="stable"))


def test_radius_kinds_group_equal_squared_distances():
    """Balls are grouped by their squared distance's bit pattern (hash table, grown past its first size)."""
    from ctsma.morphometry.paint import _radius_kinds

    rng = np.random.default_rng(1)
    for n_distinct in (1, 7, 600, 5000):
        d2 = rng.choice(rng.uniform(0.01, 9.0, n_distinct).astype(np.float32), 20000)
        rad = np.sqrt(d2.astype(np.float64))
        radii, kind = _radius_kinds(d2, rad)
        assert len(radii) == len(np.unique(d2))
        np.testing.assert_array_equal(radii[kind], rad)  # each ball's kind holds its own radius


@pytest.mark.parametrize("sp", [(0.3, 0.3, 0.3), (0.6, 0.3, 0.3), (0.5, 1.0, 0.8)])
def test_batch_equals_measure_binary_in_a_round_roi(sp):
    """The batch and the one-image ROI path compute on the same grid (`unit_spacing`): equal values. Before,
    with distances in mm, a spherical ROI at 0.3 mm gave Tb.Th 4e-5 apart between the two."""
    from ctsma.morphometry import measure_binary
    rng = np.random.default_rng(1)
    p = np.stack([_field(rng, (32, 32, 32), 1.5, 0.5) for _ in range(4)])
    zz, yy, xx = np.ogrid[:32, :32, :32]
    roi = (zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 14) ** 2 < 14 ** 2
    out = measure_batch(p, sp, masks=np.broadcast_to(roi, p.shape), workers=1)
    for i in range(len(p)):
        r = measure_binary(p[i], sp, roi, surface=False)
        for k in ("Tb.Th", "Tb.Sp"):
            assert out[k][i] == pytest.approx(r[k], rel=1e-12)
