"""Morphometry engine: analytic structures with known truth, conventions, API contract, errors."""

import numpy as np
import pytest

from ctsma.errors import UserError
from ctsma.morphometry import MorphometryWarning, local_thickness, measure, measure_batch


def _plates(shape, axis, t, period, start=3):
    b = np.zeros(shape, bool)
    idx = [slice(None)] * 3
    for s in range(start, shape[axis] - t, period):
        idx[axis] = slice(s, s + t)
        b[tuple(idx)] = True
    return b


@pytest.mark.parametrize("t", [2, 3, 4, 5, 7])
def test_axis_plate_default_is_exact_and_bonej_rule(t):
    b = _plates((24, 20, 20), 0, t, 40, start=6)
    lt_def = local_thickness(b, (1.0, 1.0, 1.0))
    lt_bj = local_thickness(b, (1.0, 1.0, 1.0), convention="bonej")
    assert np.allclose(lt_def[b], t)
    assert np.allclose(lt_bj[b], t + (t % 2))  # BoneJ: t for even, t+1 for odd thickness
    assert (lt_def[~b] == 0).all()


def test_anisotropic_spacing_plates_in_mm():
    sp = (0.3, 0.1, 0.2)
    for axis, t in ((0, 5), (1, 4), (2, 3)):
        b = _plates((30, 30, 30), axis, t, 60, start=10)
        lt = local_thickness(b, sp)
        assert np.allclose(lt[b], t * sp[axis], rtol=1e-5)


@pytest.mark.parametrize("sp", [(1.0, 0.3, 0.3), (0.3, 0.1, 0.25), (0.6, 0.3, 0.3)])
def test_default_thickness_never_below_the_finest_spacing_at_anisotropic_spacing(sp):
    """A structure one voxel thin along a fine axis, whose distance gradient at the ridge points along a coarse
    axis, got a plate correction of half the coarse spacing: thickness near 0 or negative (down to -0.4 mm at
    (1.0, 0.3, 0.3) mm before the bound). The ridge voxel itself belongs to the structure, so the diameter is at
    least the finest spacing; one-voxel structures along the finest axis reach that bound."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    f = ndimage.gaussian_filter(rng.normal(size=(30, 40, 40)), (0.7, 1.0, 1.0))
    b = f > np.quantile(f, 0.7)
    for phase in (b, ~b):
        lt = local_thickness(phase, sp)[phase]
        assert lt.min() >= min(sp) * (1 - 1e-6)
        assert np.isclose(lt.min(), min(sp), rtol=1e-5)  # thin structures exist and sit on the bound
    # a plate one voxel thick along the finest axis reads that voxel, whatever the other spacings
    plate = np.zeros((12, 12, 12), bool)
    plate[:, :, 6] = True
    assert np.allclose(local_thickness(plate, sp)[plate], sp[2], rtol=1e-5)


def test_sphere_default_within_half_voxel():
    n = 28
    z, y, x = np.mgrid[:n, :n, :n]
    c = (13.3, 13.8, 14.1)
    r = 6.0
    b = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r * r
    assert abs(local_thickness(b, (1, 1, 1))[b].mean() - 2 * r) <= 0.5


def test_measure_contract_keys_and_values_on_plates():
    b = _plates((40, 16, 16), 0, 4, 20)  # plates 4 thick, marrow 16 thick
    roi = np.zeros(b.shape, bool)
    roi[3:23] = True  # exactly one period: plate 3..6, marrow 7..22
    res = measure(b, (0.5, 1.0, 1.0), roi)
    for key in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "BS/BV", "Conn.D", "Tb.Th.sd", "Tb.Sp.sd", "Tb.N.formula",
                "Tb.N.plate", "convention", "binarisation", "spacing", "roi_voxels", "histograms"):
        assert key in res
    assert res["BV/TV"] == pytest.approx(4 / 20)
    assert res["Tb.Th"] == pytest.approx(2.0)
    assert res["Tb.Sp"] == pytest.approx(8.0)
    assert res["Tb.N"] == pytest.approx(0.1)
    assert res["Tb.N.plate"] == pytest.approx(0.1)
    assert res["spacing"] == [1.0, 1.0, 0.5]
    assert res["roi_voxels"] == 20 * 16 * 16


def test_batch_matches_single_and_flags_degenerate_patches():
    rng = np.random.default_rng(1)
    from scipy import ndimage
    f = ndimage.gaussian_filter(rng.normal(size=(3, 20, 20, 20)), (0, 1.5, 1.5, 1.5))
    p = f > 0.05
    p[1] = True  # all bone
    with pytest.warns(MorphometryWarning):
        out = measure_batch(p, (1.0, 1.0, 1.0), workers=2)
    one = measure(p[0], (1.0, 1.0, 1.0))
    for k in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N"):
        assert out[k][0] == pytest.approx(one[k])
    assert out["BV/TV"][1] == 1.0 and np.isnan(out["Tb.Sp"][1]) and np.isnan(out["Tb.N"][1])


@pytest.mark.parametrize("bad, spacing", [
    (np.zeros((5, 5), bool), (1, 1, 1)),
    (np.zeros((1, 5, 5), bool), (1, 1, 1)),
    (np.ones((5, 5, 5), bool), (1, 0, 1)),
    (np.full((5, 5, 5), np.nan), (1, 1, 1)),
])
def test_bad_inputs_give_user_errors(bad, spacing):
    with pytest.raises(UserError):
        measure(bad, spacing, modality="ct" if bad.dtype != bool else "binary")


def test_empty_roi_is_an_error_and_all_bone_is_nan_with_warning():
    b = np.ones((6, 6, 6), bool)
    with pytest.raises(UserError):
        measure(b, (1, 1, 1), np.zeros(b.shape, bool))
    with pytest.warns(MorphometryWarning):
        res = measure(b, (1, 1, 1))
    assert res["BV/TV"] == 1.0 and np.isnan(res["Tb.Sp"]) and np.isnan(res["Tb.N"])


def test_an_all_bone_image_has_the_surface_of_its_closed_border():
    """BS/BV closes the mesh at the ROI border, the image's included: an all-bone image read 0 while the same image
    with one interior marrow voxel read the whole box's faces (0.6 /mm here), in both the whole and the slab run."""
    from ctsma.morphometry import measure_binary

    b = np.ones((20, 20, 20), bool)
    sp = (0.5, 0.5, 0.5)
    holed = b.copy()
    holed[10, 10, 10] = False
    near = measure_binary(holed, sp)["BS/BV"]
    for slabs in ("never", 5):
        with pytest.warns(MorphometryWarning):
            res = measure_binary(b, sp, slabs=slabs)
        assert res["BS/BV"] == pytest.approx(near, rel=0.01) and res["BS/BV"] == pytest.approx(6 / 10, rel=0.05)


def test_parallel_power_labels_equal_serial():
    """The threaded kernel compiles (parfor indices are unsigned) and gives the serial result."""
    from ctsma.morphometry.power import power_labels

    rng = np.random.default_rng(0)
    dsq = (rng.random(10 * 11 * 12) > 0.5).astype(np.float32) * rng.random(10 * 11 * 12).astype(np.float32)
    a1, d1 = power_labels((10, 11, 12), dsq, 1.0, 0.5, 0.5, True)
    a2, d2 = power_labels((10, 11, 12), dsq, 1.0, 0.5, 0.5, False)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_allclose(d1, d2)


@pytest.mark.parametrize("sp", [(1.0, 1.0, 1.0), (0.3, 0.3, 0.3), (0.7, 0.4, 0.25)])
def test_sphere_values_interior_path_is_the_general_one_bit_for_bit(sp):
    """_values_at takes a border-free path for balls off the image border: same values as _default_radius."""
    import edt
    import numba
    from scipy import ndimage

    from ctsma.morphometry.thickness import _default_radius, _level_lengths, _values_at

    @numba.njit
    def general(rt, idx, hs):
        nz, ny, nx = rt.shape
        olens = _level_lengths(hs)
        out = np.empty(idx.shape[0], np.float32)
        for i in range(idx.shape[0]):
            f = idx[i]
            z, y, x = f // (nx * ny), (f // nx) % ny, f % nx
            out[i] = 2.0 * _default_radius(rt, z, y, x, rt[z, y, x], hs, olens)
        return out

    rng = np.random.default_rng(5)
    for shape in [(20, 23, 17), (3, 30, 30), (12, 12, 12)]:
        f = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
        b = f > np.quantile(f, 0.6)
        rt = np.sqrt(edt.edtsq(b.astype(np.uint8), anisotropy=sp, black_border=False)).astype(np.float32)
        idx = np.flatnonzero(b)  # every phase voxel: border and interior, plates, rods and blobs
        assert np.array_equal(_values_at(rt, idx, *sp, True), general(rt, idx, tuple(sp)))
        assert np.array_equal(_values_at(rt, idx, *sp, False), 2.0 * rt.ravel()[idx])


def test_threaded_local_thickness_equals_single_thread():
    """The threaded painter compiles (unsigned parfor indices) and gives the single-thread map."""
    from ctsma.morphometry import local_thickness

    rng = np.random.default_rng(1)
    b = rng.random((24, 26, 28)) > 0.6
    np.testing.assert_allclose(local_thickness(b, (0.5, 0.4, 0.4), threads=2),
                               local_thickness(b, (0.5, 0.4, 0.4), threads=1), rtol=1e-6)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.8])
def test_direct_painter_gives_the_block_painters_map(fraction):
    """The direct painter (one sphere after the other, branch-free row bit masks) and the block painter paint the
    same voxels with the same values; rows wider and planes taller than one bit word."""
    from scipy import ndimage

    from ctsma.morphometry.paint import _chords, _paint_direct, _radius_kinds, paint, sphere_arrays
    from ctsma.morphometry.power import reduced_axis
    from ctsma.morphometry.thickness import _values_at, distance_sq

    rng = np.random.default_rng(7)
    f = ndimage.gaussian_filter(rng.normal(size=(14, 70, 45)), 1.2)
    b = f > np.quantile(f, fraction)
    sp = (0.5, 0.3, 0.4)
    dsq = distance_sq(b, sp)
    idx = reduced_axis(b.shape, dsq.ravel(), b.ravel(), *sp)
    val = _values_at(np.sqrt(dsq), idx, *sp, True)
    order = np.argsort(-val, kind="stable")
    cz, cy, cx, rad = sphere_arrays(b.shape, idx[order], dsq.ravel()[idx[order]])
    radii, kind = _radius_kinds(dsq.ravel()[idx[order]], rad)
    direct = np.zeros(b.shape, np.float32)
    _paint_direct(b, direct, cz, cy, cx, kind, val[order], *_chords(radii, *sp))
    blocks = paint(b, dsq, idx[order], val[order], *sp, parallel=True)
    assert np.count_nonzero(direct) == np.count_nonzero(b)
    np.testing.assert_array_equal(direct, blocks)


def _partial_volume_mr(thick_mm, period_mm, voxel_mm=0.3, fine_mm=0.01, n=40, noise=0.0, seed=0):
    """Bone-dark MR of plates normal to z, integrated over voxels (true partial volume), bone 0, marrow 1."""
    k = int(round(voxel_mm / fine_mm))
    z = (np.arange(n * k) + 0.5) * fine_mm + 0.137  # plates not aligned with voxel edges
    bone = (np.mod(z, period_mm) < thick_mm).astype(np.float64)
    profile = 1.0 - bone.reshape(n, k).mean(1)
    img = np.broadcast_to(profile[:, None, None], (n, 12, 12)).astype(np.float32).copy()
    img += np.random.default_rng(seed).normal(0, noise, img.shape).astype(np.float32)
    return img, float(bone.mean())


@pytest.mark.parametrize("thick,period", [(0.2, 1.0), (0.3, 1.2), (0.15, 0.9)])  # marrow wider than 2 voxels
def test_bvf_binarisation_keeps_the_volume_fraction_where_otsu_misses_it(thick, period):
    from skimage.filters import threshold_otsu

    from ctsma.morphometry import bvf_binarise, measure_binary

    img, true_bvtv = _partial_volume_mr(thick, period, noise=0.02)  # noise also breaks exact ties
    bone, roi, info = bvf_binarise(img, None, supersample=2)
    assert bone.shape == tuple(2 * s for s in img.shape) and roi.all()
    assert info["method"] == "bvf-volume-conserving" and info["marrow_level"] == pytest.approx(1.0, abs=0.06)
    assert bone.mean() == pytest.approx(true_bvtv, abs=0.04)  # volume kept (clipped noise biases it up a little)
    otsu = img < threshold_otsu(img)
    assert abs(bone.mean() - true_bvtv) < abs(otsu.mean() - true_bvtv)
    # plate thickness on the supersampled grid is closer to the truth than on Otsu's voxels (plates of at least
    # two thirds of a voxel; thinner ones both overestimate)
    if thick < 0.2:
        return
    th_bvf = measure_binary(bone, (0.15, 0.15, 0.15))["Tb.Th"]
    th_otsu = measure_binary(otsu, (0.3, 0.3, 0.3))["Tb.Th"]
    assert abs(th_bvf - thick) < abs(th_otsu - thick) + 1e-9 and abs(th_bvf - thick) <= 0.15


@pytest.mark.parametrize("k", [2, 3, 4])
def test_bvf_supersampling_equals_scipy_zoom(k):
    """The separable upsamplers give scipy's trilinear / nearest zoom (grid mode, edges clamped): bit for bit for
    k = 2 and 4, whose weights are exact binary fractions, within float32 rounding for k = 3."""
    import importlib

    from scipy import ndimage

    b = importlib.import_module("ctsma.morphometry.binarise")
    rng = np.random.default_rng(k)
    for shape in [(1, 1, 1), (2, 5, 3), (7, 1, 9), (16, 12, 10)]:
        a = rng.random(shape).astype(np.float32)
        a[a < 0.2], a[a > 0.9] = 0.0, 1.0
        a[: shape[0] // 2] *= np.float32(1e-6) ** rng.random(a[: shape[0] // 2].shape).astype(np.float32)
        ref = ndimage.zoom(a, k, order=1, mode="nearest", grid_mode=True)
        up = b.upsample_linear(a, k)
        assert up.dtype == np.float32 and up.shape == ref.shape == tuple(k * s for s in shape)
        if k in (2, 4):
            assert np.array_equal(up, ref)
        else:
            assert np.allclose(up, ref, rtol=2e-7, atol=1e-12)
        roi = rng.random(shape) > 0.5
        assert np.array_equal(b.upsample_nearest(roi, k),
                              ndimage.zoom(roi.astype(np.uint8), k, order=0, mode="nearest", grid_mode=True) > 0)


def test_bvf_binarisation_refusals_and_marrow_floor():
    from ctsma.morphometry import MorphometryError, bvf_binarise

    img, _ = _partial_volume_mr(0.2, 1.0)
    with pytest.raises(MorphometryError, match="supersample"):
        bvf_binarise(img, supersample=5)
    with pytest.raises(MorphometryError, match="not above the bone level"):
        bvf_binarise(np.zeros((8, 8, 8), np.float32))
    # a ROI lying on bone only: without a floor its darkest-is-marrow level would call half of it marrow
    plate = np.full((8, 8, 8), 0.05, np.float32)
    plate[::2] = 0.1
    assert bvf_binarise(plate, min_marrow_level=0.8)[0].mean() >= 0.9  # its mean fraction is 0.91
    assert bvf_binarise(plate)[0].mean() <= 0.5


def test_bs_bv_of_a_box_plate_and_conn_d_of_bars_and_a_ring():
    """Analytic BS/BV and Conn.D in physical units (anisotropic spacing, so the voxel volume and the mesh's
    spacing both count). A 60 x 60 x 4-voxel box has BS/BV = (2 L^2 + 4 L t) / (L^2 t); marching cubes on a binary
    box bevels its edges (a 45-degree chamfer half a voxel wide), so the mesh is about 2 % smaller. Conn.D is
    (1 - chi) / TV: three separate bars have chi = 3, a square ring chi = 0."""
    sp = (0.5, 0.8, 0.8)  # z, y, x mm
    b = np.zeros((12, 66, 66), bool)
    b[4:8, 3:63, 3:63] = True  # t = 4 voxels (2 mm) along z, L = 60 voxels (48 mm)
    res = measure(b, sp)
    t_mm, l_mm = 4 * sp[0], 60 * sp[1]
    box = (2 * l_mm ** 2 + 4 * l_mm * t_mm) / (l_mm ** 2 * t_mm)
    assert res["BS/BV"] == pytest.approx(box, rel=0.03) and res["BS/BV"] < box
    tv = b.size * np.prod(sp)
    assert res["Conn.D"] == pytest.approx((1 - 1) / tv, abs=1e-12)  # one simply connected body: chi = 1
    bars = np.zeros((20, 20, 20), bool)
    for x in (3, 9, 15):
        bars[2:18, 8:11, x:x + 2] = True
    assert measure(bars, sp)["Conn.D"] == pytest.approx((1 - 3) / (bars.size * np.prod(sp)))
    ring = np.zeros((20, 20, 20), bool)
    ring[8:11, 3:17, 3:17] = True
    ring[8:11, 6:14, 6:14] = False  # a square ring, 3 voxels wide: one tunnel
    assert measure(ring, sp)["Conn.D"] == pytest.approx(1 / (ring.size * np.prod(sp)))
    corner = np.zeros((12, 12, 12), bool)  # two cubes that touch at one corner: one 26-connected body
    corner[2:6, 2:6, 2:6] = corner[6:10, 6:10, 6:10] = True
    assert measure(corner, sp)["Conn.D"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("slabs", ["never", 8])
def test_a_misspelt_thickness_method_is_refused(slabs):
    """``thickness_method="Exact"`` ran the fast method and recorded "Exact" as the method used (and in z-slabs
    sized the halo for the exact method while painting the fast one)."""
    from ctsma.morphometry import measure_binary
    from ctsma.morphometry.slabs import measure_in_slabs

    b = _plates((16, 16, 16), 0, 3, 7)
    with pytest.raises(UserError, match="local-thickness method"):
        measure(b, (1, 1, 1), thickness_method="Exact", slabs=slabs)
    with pytest.raises(UserError, match="local-thickness method"):
        measure_binary(b, (1, 1, 1), method="slow", slabs=slabs)
    with pytest.raises(UserError, match="local-thickness method"):
        measure_in_slabs(b, np.ones(b.shape, bool), (1, 1, 1), method="slow", slab_planes=8)
    assert measure(b, (1, 1, 1), thickness_method="exact", slabs=slabs)["thickness_method"] == "exact"
