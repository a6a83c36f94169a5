"""Inference maps: Gaussian blending, ROI tables and display ranges on known inputs."""

import numpy as np
import pytest

from ctsma.inference.maps import blend_maps, display_ranges, roi_table


def patch_centres(rois: np.ndarray, spacing_zyx, stride_mm: float):
    """Voxel indices (z, y, x) on a grid of ``stride_mm`` in each ROI, centred in its bounding box, and each
    centre's label; an ROI thinner than the grid gets its most central voxel (the patches the blends below get)."""
    step = np.maximum(1, np.round(stride_mm / np.asarray(spacing_zyx, float)).astype(int))
    centres, labels = [], []
    for label in sorted(int(v) for v in np.unique(rois) if v):
        idx = np.argwhere(rois == label)
        lo, hi = idx.min(0), idx.max(0)
        chosen = idx[np.all((idx - lo - ((hi - lo) % step) // 2) % step == 0, axis=1)]
        if not len(chosen):
            chosen = idx[[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]]
        centres.append(chosen)
        labels.append(np.full(len(chosen), label, np.int16))
    return np.concatenate(centres), np.concatenate(labels)


def _rois():
    r = np.zeros((20, 30, 40), np.int16)
    r[2:8, 2:28, 2:20] = 1     # MFC
    r[2:8, 2:28, 21:38] = 2    # LFC
    r[12:14, 10:12, 10:12] = 3  # a tiny MTP, thinner than the stride
    return r


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


def test_display_ranges_follow_the_models_training_references():
    """The colour scale of a model's maps: its training references' mean ± 3 SD, clipped to what a parameter can
    be. The demo's student learns MR-apparent Tb.Th of about 0.74 mm, which a fixed 0.05-0.45 mm scale showed in its
    top colour everywhere."""
    meta = {"parameters": ["BV/TV", "Tb.Th", "Tb.Sp", "Tb.N"],
            "target_normalisation": {"mean": [0.9, 0.744, 1.5, 0.05], "sd": [0.05, 0.046, 0.085, 0.02]}}
    r = display_ranges(meta)
    assert r["Tb.Th"] == pytest.approx([0.744 - 0.138, 0.744 + 0.138])
    assert r["Tb.Sp"] == pytest.approx([1.245, 1.755])
    assert r["BV/TV"] == pytest.approx([0.75, 1.0])  # not above 1
    assert r["Tb.N"] == pytest.approx([0.0, 0.11])  # not below 0
    assert display_ranges({"parameters": ["BV/TV"]}) == {}  # no normalisation recorded: no range
