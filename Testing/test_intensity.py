"""The CT's bone intensity against a model's training knees (``ctsma.inference.intensity``)."""

from __future__ import annotations

import numpy as np
import pytest

from ctsma.inference.intensity import (MARGIN, intensity_check, knee_intensity, patch_means, store_patch_means,
                                      training_intensity)


def _knee(rng, level, n=30):
    """n patches (n, 1, 4, 4, 4) whose means are spread around ``level`` HU."""
    return level + rng.normal(0, 40, (n, 1, 1, 1, 1)) + rng.normal(0, 200, (n, 1, 4, 4, 4))


def test_knee_intensity_is_the_median_of_the_patch_means():
    patches = np.stack([np.full((1, 3, 3, 3), v, np.float32) for v in (100, 400, 250, 90, 1000)])
    patches[1, 0, 0, 0, 0] += 27 * 10  # its mean: 410
    assert knee_intensity(patches) == pytest.approx(250)
    assert knee_intensity(patches[:4]) == pytest.approx((250 + 100) / 2)


def test_training_record_from_the_training_knees_only():
    rng = np.random.default_rng(0)
    levels = {"a": 400, "b": 500, "c": 600, "d": 5000}  # d: a test knee, which must not enter the record
    patches = np.concatenate([_knee(rng, v) for v in levels.values()])
    subjects = np.repeat(list(levels), 30)
    means = patch_means(patches)
    rec = training_intensity(means, subjects, ["a", "b", "c"])
    per_knee = [knee_intensity(patches[subjects == s]) for s in "abc"]
    assert rec["n_knees"] == 3 and rec["knee_mean_hu"] == pytest.approx(np.mean(per_knee))
    assert rec["knee_sd_hu"] == pytest.approx(np.std(per_knee, ddof=1))
    assert rec["knee_range_hu"] == pytest.approx([min(per_knee), max(per_knee)])
    assert training_intensity(means, subjects, ["a", "b"]) is None  # too few knees for a spread
    assert training_intensity(means, subjects, ["a", "b", "x"]) is None  # a knee without patches counts for nothing


def test_store_patch_means_read_in_chunks_equal_one_read(tmp_path):
    from ctsma.dataset.synthetic import make_synthetic_store

    store = make_synthetic_store(tmp_path / "store", n_subjects=3, patches_per_subject=7)
    idx = np.array([20, 3, 4, 5, 11, 0])
    np.testing.assert_array_equal(store_patch_means(store, idx, chunk=4), patch_means(store.read("ct", idx)))
    assert store_patch_means(store, np.zeros(0, int)).shape == (0,)


def test_a_ct_outside_the_widened_training_range_gets_a_warning():
    ref = {"knee_mean_hu": 500.0, "knee_sd_hu": 40.0, "knee_range_hu": [440.0, 620.0], "n_knees": 19}
    lo, hi = 440 - MARGIN * 180, 620 + MARGIN * 180
    for value, warned in ((500, False), (hi - 1, False), (lo + 1, False), (hi + 1, "brighter"), (lo - 1, "darker")):
        info, warns = intensity_check(np.full((5, 1, 2, 2, 2), value, np.float32), ref)
        assert info["knee_hu"] == pytest.approx(value) and info["model_band_hu"] == pytest.approx([lo, hi])
        assert bool(warns) == bool(warned)
        if warned:
            assert len(warns) == 1 and warned in warns[0] and "19 training knees" in warns[0]
    # a model file without the record (trained before it existed): the value is reported, nothing compared
    info, warns = intensity_check(np.full((5, 1, 2, 2, 2), 5000.0), None)
    assert info["knee_hu"] == 5000 and info["model_reference"] is None and warns == []
