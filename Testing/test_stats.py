"""ctsma.stats: ICC against pingouin, DeLong against brute force / sklearn / bootstrap, cluster bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctsma import stats


def _paired(n=40, seed=0, noise=0.5, bias=0.3):
    rng = np.random.default_rng(seed)
    truth = rng.normal(10, 2, n)
    return truth, truth + bias + rng.normal(0, noise, n)


@pytest.mark.parametrize("seed,noise,bias", [(0, 0.5, 0.3), (1, 2.0, 1.0), (2, 1.0, -2.0)])
def test_icc_matches_pingouin(seed, noise, bias):
    import pingouin as pg  # a test extra: missing it must fail, not skip the peer check

    ref, meas = _paired(30 + seed, seed, noise, bias)
    long = pd.DataFrame({"subject": np.tile(np.arange(ref.size), 2), "rater": np.repeat(["ref", "meas"], ref.size),
                         "value": np.concatenate([ref, meas])})
    tab = pg.intraclass_corr(long, targets="subject", raters="rater", ratings="value")
    # pingouin >= 0.6 names the types after McGraw & Wong (ICC(A,1), ICC(C,1)) and the CI column "CI95"
    tab = tab.replace({"Type": {"ICC2": "ICC(A,1)", "ICC3": "ICC(C,1)"}}).set_index("Type")
    tab = tab.rename(columns={"CI95%": "CI95"})
    i2, i3 = stats.icc21(ref, meas), stats.icc31(ref, meas)
    assert i2.value == pytest.approx(tab.loc["ICC(A,1)", "ICC"], abs=1e-10)
    assert i3.value == pytest.approx(tab.loc["ICC(C,1)", "ICC"], abs=1e-10)
    assert i3.F == pytest.approx(tab.loc["ICC(C,1)", "F"], rel=1e-9)
    # pingouin rounds its CIs to 2 decimals
    np.testing.assert_allclose(i2.ci, tab.loc["ICC(A,1)", "CI95"], atol=0.0051)
    np.testing.assert_allclose(i3.ci, tab.loc["ICC(C,1)", "CI95"], atol=0.0051)
    assert i2.ci[0] < i2.value < i2.ci[1] and i3.ci[0] < i3.value < i3.ci[1]


def test_icc_analytic_cases():
    ref = np.arange(10.0)
    assert stats.icc21(ref, ref).value == pytest.approx(1.0)
    # a constant offset keeps consistency perfect but lowers absolute agreement
    assert stats.icc31(ref, ref + 5).value == pytest.approx(1.0)
    assert stats.icc21(ref, ref + 5).value < 0.6
    # three raters table, and missing rows are dropped listwise
    tab = np.column_stack([ref, ref + 0.1, ref - 0.1])
    tab[3, 1] = np.nan
    assert stats.icc(tab, kind="3,1").n == 9
    with pytest.raises(ValueError, match="unknown ICC kind '1,1'"):
        stats.icc(tab, kind="1,1")


def test_icc_value_alone_is_the_same_number():
    """The bootstraps take the value without the CI: the same float, bit for bit, for both kinds and with NaNs."""
    rng = np.random.default_rng(5)
    for n, noise in ((40, 0.5), (200, 2.0), (7, 0.05)):
        ref, meas = _paired(n, int(n), noise, 0.4)
        meas[rng.integers(0, n)] = np.nan
        for kind in ("2,1", "3,1"):
            assert stats.icc_value(ref, meas, kind=kind) == stats.icc(ref, meas, kind=kind).value
    with pytest.raises(ValueError, match="unknown ICC kind"):
        stats.icc_value(ref, meas, kind="1,1")


def test_pearson_mae_bland_altman():
    ref = np.array([1.0, 2, 3, 4, 5])
    meas = np.array([1.5, 2.5, 3.0, 4.5, 6.0])
    d = meas - ref
    assert stats.mae(ref, meas) == pytest.approx(np.mean(np.abs(d)))
    ba = stats.bland_altman(ref, meas)
    assert ba["ba_bias"] == pytest.approx(d.mean())
    assert ba["ba_loa"][1] - ba["ba_loa"][0] == pytest.approx(2 * 1.96 * d.std(ddof=1))
    assert stats.pearson_r(ref, 2 * ref + 1) == pytest.approx(1.0)
    assert np.isnan(stats.pearson_r(ref, np.ones(5)))
    s = stats.agreement_summary(ref, meas)
    assert set(s) == {"icc21", "icc21_ci", "icc31", "icc31_ci", "pearson_r", "mae", "ba_bias", "ba_loa"}


def _brute_auc_components(y, s):
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def test_auc_delong_matches_bruteforce_and_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = np.round(y * 0.8 + rng.normal(0, 1, 60), 1)  # rounding creates ties
    res = stats.auc_delong(y, s)
    auc, v10, v01 = _brute_auc_components(y, s)
    assert res.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert res.auc == pytest.approx(auc, abs=1e-12)
    var = v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size
    assert res.se == pytest.approx(np.sqrt(var), rel=1e-10)
    assert res.ci[0] < res.auc < res.ci[1]


def test_delong_se_agrees_with_bootstrap_and_perfect_separation():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    s = y * 1.0 + rng.normal(0, 1, 100)
    res = stats.auc_delong(y, s)
    boot = []
    for _ in range(600):
        i = np.r_[rng.integers(0, 50, 50), 50 + rng.integers(0, 50, 50)]  # stratified resample
        boot.append(roc_auc_score(y[i], s[i]))
    assert res.se == pytest.approx(np.std(boot, ddof=1), rel=0.15)
    perfect = stats.auc_delong([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert perfect.auc == 1.0 and perfect.ci == (1.0, 1.0)
    with pytest.raises(ValueError, match="needs at least one positive and one negative case"):
        stats.auc_delong([1, 1, 1], [0.2, 0.3, 0.4])


def test_delong_test_for_correlated_aucs():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    latent = y + rng.normal(0, 0.7, 120)
    good = latent + rng.normal(0, 0.2, 120)
    poor = latent + rng.normal(0, 2.0, 120)
    t = stats.delong_test(y, good, poor)
    assert t.auc_a > t.auc_b and t.p < 0.01 and t.diff_ci[0] > 0
    same = stats.delong_test(y, good, good)
    assert same.p == 1.0 and same.diff == 0.0
    # symmetry
    t2 = stats.delong_test(y, poor, good)
    assert t2.z == pytest.approx(-t.z) and t2.p == pytest.approx(t.p)
    # a monotone transform does not change the AUC
    assert stats.delong_test(y, good, np.exp(good)).p == 1.0
    # different AUCs with no spread to test against (perfect against constant scores, 4 knees): undefined, not 0
    flat = stats.delong_test([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5])
    assert flat.diff == 0.5 and np.isnan(flat.p) and np.isnan(flat.z)
    # the variance of the difference is brute-force checked
    _, a10, a01 = _brute_auc_components(y, good)
    _, b10, b01 = _brute_auc_components(y, poor)
    var = (np.var(a10 - b10, ddof=1) / a10.size + np.var(a01 - b01, ddof=1) / a01.size)
    assert t.z == pytest.approx(t.diff / np.sqrt(var), rel=1e-9)


def test_binary_and_regression_metrics():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.1, 0.3, 0.8])
    m = stats.binary_metrics(y, p)
    # tp=3 (0.9,0.6,0.8), fn=1, fp=1 (0.7), tn=3
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 3)
    assert m["accuracy"] == 0.75 and m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    assert m["precision"] == 0.75 and m["f1"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert np.isnan(stats.binary_metrics([0, 1], [0.1, 0.2])["precision"])
    r = stats.regression_metrics([1, 2, 3, 4], [1, 2, 3, 5])
    assert r["mae"] == 0.25 and r["r2"] == pytest.approx(1 - 1 / 5)


def test_cluster_bootstrap_resamples_patients():
    rng = np.random.default_rng(6)
    # 30 patients, 20 patches each: strong within-patient correlation
    pid = np.repeat(np.arange(30), 20)
    x = np.repeat(rng.normal(0, 1, 30), 20) + rng.normal(0, 0.1, 600)
    res = stats.cluster_bootstrap(np.mean, x, pid, n_boot=400, seed=1)
    # the cluster SE is about sd(patient means)/sqrt(30); the naive patch SE would be ~4.5x smaller
    expected = np.std(x.reshape(30, 20).mean(axis=1), ddof=1) / np.sqrt(30)
    assert res.se == pytest.approx(expected, rel=0.25)
    assert res.ci[0] < res.estimate < res.ci[1]
    assert stats.cluster_bootstrap(np.mean, x, pid, n_boot=50, seed=1).ci == \
        stats.cluster_bootstrap(np.mean, x, pid, n_boot=50, seed=1).ci  # deterministic by seed


def test_cluster_bootstrap_dataframe_and_paired_difference():
    rng = np.random.default_rng(7)
    n = 40
    truth = rng.normal(0, 1, n)
    df = pd.DataFrame({"subject": [f"s{i}" for i in range(n)], "ref": truth,
                       "good": truth + rng.normal(0, 0.3, n), "poor": truth + rng.normal(0, 1.0, n)})

    def icc_of(col):
        return lambda d: stats.icc21(d["ref"], d[col]).value

    diff = stats.cluster_bootstrap_diff(icc_of("good"), icc_of("poor"), df, "subject", n_boot=300, seed=0)
    assert diff.estimate == pytest.approx(icc_of("good")(df) - icc_of("poor")(df))
    assert diff.ci[0] > 0 and diff.p < 0.05
    null = stats.cluster_bootstrap_diff(icc_of("good"), icc_of("good"), df, "subject", n_boot=50, seed=0)
    assert null.estimate == 0 and null.p == 1.0
    # a statistic that aggregates per patient sees duplicated draws as separate clusters
    seen = []
    stats.cluster_bootstrap(lambda d: seen.append(d["_cluster"].nunique()) or 0.0, df, "subject", n_boot=5)
    assert seen == [n] * 6
