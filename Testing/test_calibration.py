"""Agreement calibration (variance matching) of the regression models: the analytic properties, the model file, and
the fit at the end of training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctsma import PARAMETERS, stats
from ctsma.errors import ModelFileError
from ctsma.modelfile import load_model, save_model
from ctsma.models import calibration as calib
from ctsma.models import load_student
from ctsma.models.export import build_meta, export_model
from ctsma.models.networks import PatchRegressor


def _shrunk(n=400, r=(0.95, 0.7, 0.6, 0.45), seed=0):
    """A reference and the conditional-mean estimate a squared-error model would give, for correlations ``r``:
    ref = s + noise, pred = E[ref | s], whose SD is r times the reference's."""
    rng = np.random.default_rng(seed)
    r = np.asarray(r)
    mean, sd = np.array([0.3, 0.2, 0.6, 1.4]), np.array([0.08, 0.03, 0.12, 0.2])
    s = rng.standard_normal((n, 4))
    z = r * s + np.sqrt(1 - r ** 2) * rng.standard_normal((n, 4))
    return mean + sd * r * s, mean + sd * z, np.repeat(np.arange(n // 20), 20).astype(str)


def test_variance_matching_equalises_mean_and_sd_and_keeps_r():
    pred, ref, subj = _shrunk()
    cal = calib.fit(pred, ref, subj)
    out = calib.apply(pred, cal)
    np.testing.assert_allclose(out.mean(0), ref.mean(0), atol=1e-12)
    np.testing.assert_allclose(out.std(0), ref.std(0), rtol=1e-12)
    for j in range(4):
        assert np.corrcoef(out[:, j], ref[:, j])[0, 1] == pytest.approx(np.corrcoef(pred[:, j], ref[:, j])[0, 1])
    assert np.all(np.asarray(cal["slope"]) > 1)              # a shrunk estimate is stretched
    assert cal["n_patients"] == 20 and cal["calibrated"] == list(PARAMETERS)


def test_variance_matching_maximises_icc21_over_linear_maps():
    """ICC(2,1) after the map is about Pearson r (from about 2r²/(1+r²) before), and no other slope (with the
    means matched) does better."""
    pred, ref, subj = _shrunk(n=2000, seed=1)
    cal = calib.fit(pred, ref, subj)
    out = calib.apply(pred, cal)
    for j in range(4):
        r = np.corrcoef(pred[:, j], ref[:, j])[0, 1]
        raw, best = stats.icc21(ref[:, j], pred[:, j]).value, stats.icc21(ref[:, j], out[:, j]).value
        assert best > raw
        assert best == pytest.approx(r, abs=0.01)
        assert raw == pytest.approx(2 * r * r / (1 + r * r), abs=0.03)
        b0 = cal["slope"][j]
        for f in (0.8, 0.9, 0.95, 1.05, 1.1, 1.25):
            b = b0 * f
            other = ref[:, j].mean() + b * (pred[:, j] - pred[:, j].mean())
            assert stats.icc21(ref[:, j], other).value < best
    # the price: a larger mean squared error (2(1-r) against 1-r² times the variance)
    assert np.mean((out - ref) ** 2) > np.mean((pred - ref) ** 2)


def test_uncorrelated_parameters_and_too_few_patients_stay_uncalibrated():
    pred, ref, subj = _shrunk(r=(0.9, 0.05, 0.8, 0.8), seed=2)
    cal = calib.fit(pred, ref, subj, min_r=0.2)
    assert cal["slope"][1] == 1.0 and cal["intercept"][1] == 0.0 and "Tb.Th" not in cal["calibrated"]
    assert cal["validation_r"][1] < 0.2
    one = calib.fit(pred, ref, np.zeros(len(pred)).astype(str))
    assert one["method"] == "none" and "1 validation patient" in one["note"]
    np.testing.assert_array_equal(calib.apply(pred, one), pred)
    assert calib.fit(pred, ref, subj, method="none")["slope"] == [1.0] * 4
    with pytest.raises(ValueError, match="unknown calibration"):
        calib.fit(pred, ref, subj, method="quantile")


def _model_file(tmp_path, calibration=None, name="m.safetensors"):
    torch.manual_seed(0)
    net = PatchRegressor(1, 16, (4, 4, 8, 8))
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8, masks=False,
                      intensity_offset=300, intensity_scale=600, target="mr", y_mean=(0.3, 0.2, 0.5, 1.5),
                      y_sd=(0.1, 0.05, 0.1, 0.3), training={"n": 1}, metrics={"val_loss": 0.5},
                      calibration=calibration)
    return export_model(tmp_path / name, net, meta)


def test_model_file_applies_its_calibration(tmp_path):
    cal = {"method": "variance", "slope": [1.5, 2.0, 1.2, 3.0], "intercept": [-0.1, -0.2, 0.05, -3.0]}
    plain, _ = load_student(_model_file(tmp_path, name="plain.safetensors"))
    model, meta = load_student(_model_file(tmp_path, cal))
    assert meta["meta_version"] == 2 and meta["calibration"]["slope"] == cal["slope"]
    x = np.random.default_rng(0).normal(300, 200, (5, 16, 16, 16)).astype(np.float32)
    raw = model.predict(x, calibrated=False)
    np.testing.assert_array_equal(raw, plain.predict(x))     # same weights; the uncalibrated file is the identity
    np.testing.assert_allclose(model.predict(x), np.array(cal["intercept"]) + np.array(cal["slope"]) * raw,
                               rtol=1e-12)
    mean, sd = model.predict_flips(x)                       # flipped copies: the mean and the SD map alike
    mean0, sd0 = model.predict_flips(x, calibrated=False)
    np.testing.assert_allclose(mean, np.array(cal["intercept"]) + np.array(cal["slope"]) * mean0, rtol=1e-12)
    np.testing.assert_allclose(sd, np.array(cal["slope"]) * sd0, rtol=1e-9)


def test_version_1_files_load_and_bad_calibrations_are_refused(tmp_path):
    path = _model_file(tmp_path)
    tensors, meta = load_model(path)
    meta.pop("_sha256")
    v1 = dict(meta, meta_version=1)
    v1.pop("calibration")
    model, _ = load_student(save_model(tmp_path / "v1.safetensors", tensors, v1, kind="student"))
    x = np.random.default_rng(1).normal(300, 200, (3, 16, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x), model.predict(x, calibrated=False))
    for bad, why in (({"slope": [1, 1, 1], "intercept": [0, 0, 0]}, "invalid"),
                     ({"slope": [1, -1, 1, 1], "intercept": [0, 0, 0, 0]}, "invalid"),
                     ({"slope": [1, 1, 1, 0], "intercept": [0, 0, 0, 0]}, "invalid"),
                     ({"slope": [1, 1, 1, float("nan")], "intercept": [0, 0, 0, 0]}, "invalid"),  # NaN is null
                     ({"intercept": [0, 0, 0, 0]}, "damaged")):
        with pytest.raises(ModelFileError, match=why):
            load_student(save_model(tmp_path / "bad.safetensors", tensors, dict(meta, calibration=bad),
                                    kind="student"))
    with pytest.raises(ModelFileError, match="reads versions 1, 2"):
        load_student(save_model(tmp_path / "v3.safetensors", tensors, dict(meta, meta_version=3), kind="student"))
