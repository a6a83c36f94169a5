"""Inference maps: patch-centre grids, Gaussian blending and ROI tables on known inputs."""

import numpy as np
import pytest

from ctsma.inference.maps import blend_maps, patch_centres, roi_table


def _rois():
    r = np.zeros((20, 30, 40), np.int16)
    r[2:8, 2:28, 2:20] = 1     # MFC
    r[2:8, 2:28, 21:38] = 2    # LFC
    r[12:14, 10:12, 10:12] = 3  # a tiny MTP, thinner than the stride
    return r


def test_centres_lie_in_their_roi_on_the_stride_grid():
    rois = _rois()
    c, lab = patch_centres(rois, (1.0, 0.5, 0.5), stride_mm=2.0)
    assert len(c) == len(lab) > 0
    assert np.all(rois[c[:, 0], c[:, 1], c[:, 2]] == lab)
    assert set(lab.tolist()) == {1, 2, 3}  # the tiny ROI still gets a centre
    mfc = c[lab == 1]
    assert np.all(np.diff(np.unique(mfc[:, 2])) == 4)  # 2 mm / 0.5 mm along x
    assert np.all(np.diff(np.unique(mfc[:, 0])) == 2)  # 2 mm / 1 mm along z


def test_constant_predictions_give_constant_maps_and_nan_outside():
    rois = _rois()
    c, lab = patch_centres(rois, (1.0, 0.5, 0.5), stride_mm=2.0)
    vals = np.where(lab[:, None] == 1, [0.3, 0.2, 0.7, 1.1], [0.1, 0.15, 0.9, 0.95]).astype(np.float32)
    maps = blend_maps(rois.shape, (1.0, 0.5, 0.5), rois, c, lab, vals, extent_mm=8.0)
    assert maps.shape == (4,) + rois.shape
    m1 = maps[:, rois == 1]
    np.testing.assert_allclose(m1, np.broadcast_to(np.array([[0.3], [0.2], [0.7], [1.1]]), m1.shape), rtol=1e-5)
    # no bleeding across the ROI border even though the windows overlap it
    m2 = maps[:, rois == 2]
    np.testing.assert_allclose(m2, np.broadcast_to(np.array([[0.1], [0.15], [0.9], [0.95]]), m2.shape), rtol=1e-5)
    assert np.all(np.isnan(maps[:, rois == 0]))


def test_linear_field_is_reproduced_between_centres():
    rois = np.zeros((10, 10, 60), np.int16)
    rois[3:7, 3:7, 5:55] = 1
    c, lab = patch_centres(rois, (0.5, 0.5, 0.5), stride_mm=2.0)
    vals = (c[:, 2:3] * 0.5).astype(np.float32)  # value = x position in mm
    m = blend_maps(rois.shape, (0.5,) * 3, rois, c, lab, vals, extent_mm=6.0)[0]
    x_mm = np.arange(60) * 0.5
    interior = m[5, 5, 15:45]
    # smooth, monotone and within 8 % of the 2 mm stride of the linear truth
    assert np.all(np.diff(interior) > 0)
    np.testing.assert_allclose(interior, x_mm[15:45], atol=0.15)


def test_roi_table_statistics():
    lab = np.array([1, 1, 1, 1, 3])
    vals = np.array([[1, 2, 3, 4], [2, 2, 3, 4], [3, 2, 3, 4], [4, 2, 3, 4], [9, 9, 9, 9]], np.float32)
    t = roi_table(vals, lab)
    assert list(t.columns) == ["roi", "parameter", "mean", "sd", "median", "iqr", "n_patches"]
    assert len(t) == 16
    row = t[(t.roi == "MFC") & (t.parameter == "BV/TV")].iloc[0]
    assert row["mean"] == pytest.approx(2.5) and row["sd"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert row["median"] == pytest.approx(2.5) and row["iqr"] == pytest.approx(1.5) and row["n_patches"] == 4
    assert t[t.roi == "LFC"]["n_patches"].eq(0).all() and t[t.roi == "LFC"]["mean"].isna().all()
    assert np.isnan(t[(t.roi == "MTP") & (t.parameter == "Tb.N")]["sd"].iloc[0])


def test_blending_in_z_slabs_equals_the_whole_blend():
    """``ctsma infer`` over its memory budget blends slab by slab: the planes must be the whole maps' bit for bit."""
    rois = _rois()
    rois[14:19, 3:25, 5:30] = 4  # an ROI whose voxels partly lie beyond every window: the nearest-patch fill
    sp = (1.0, 0.5, 0.5)
    c, lab = patch_centres(rois, sp, stride_mm=3.0)
    c = c[lab != 4]  # LTP gets only two far patches, so most of it is filled from the nearest one
    lab = lab[lab != 4]
    extra = np.argwhere(rois == 4)[[0, -1]]
    c, lab = np.concatenate([c, extra]), np.concatenate([lab, [4, 4]]).astype(np.int16)
    vals = np.random.default_rng(0).uniform(0.1, 2.0, (len(c), 4)).astype(np.float32)
    whole = blend_maps(rois.shape, sp, rois, c, lab, vals, extent_mm=4.0)
    assert np.isfinite(whole[:, rois == 4]).all()
    for step in (1, 3, 7):
        parts = [blend_maps(rois.shape, sp, rois, c, lab, vals, extent_mm=4.0, z_range=(z, min(z + step, 20)))
                 for z in range(0, 20, step)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
