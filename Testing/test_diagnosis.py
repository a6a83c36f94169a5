"""Patient-level diagnosis: signal recovery on synthetic cohorts, honest CV, model files, CLI, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ctsma import diagnosis as dg
from ctsma.diagnosis import synthetic as syn
from ctsma.diagnosis.data import Normaliser
from ctsma.errors import ModelFileError, UserError

FAST_TF = {"steps": 60}   # keeps the test quick; the default settings are exercised by the benchmark


@pytest.fixture(scope="module")
def cohort():
    return syn.synthetic_cohort(40, 6, effect=2.0, seed=0)


def test_logistic_recovers_known_signal_and_its_location(cohort):
    table, labels = cohort
    res = dg.cross_validate(table, labels, "logistic", folds=4, seed=0)
    assert res.metrics["auc"] > 0.85
    assert len(res.oof) == 40 and res.oof["oa_probability"].between(0, 1).all()
    assert set(res.oof["fold"]) == {0, 1, 2, 3}
    # the fitted model puts its largest weight on an MTP feature, where the synthetic OA effect lives
    model = dg.train(table, labels, "logistic", folds=None)
    coef = model.aggregator.coefficients()
    assert max(coef, key=lambda k: abs(coef[k])).startswith("MTP_")


def test_noise_free_beats_noisy_source_with_paired_test(cohort):
    table, labels = cohort
    noisy = syn.measured(table, 3.0, seed=5)
    block, results = dg.compare_sources({"student_distilled": table, "student_baseline": noisy}, labels,
                                        ["logistic"], folds=4, seed=0)
    good, bad = block["student_distilled/logistic"], block["student_baseline/logistic"]
    assert good["auc"] > bad["auc"]
    assert 0 <= good["p_auc_vs_student_baseline"] < 0.05
    assert good["auc_diff_vs_student_baseline"] == pytest.approx(good["auc"] - bad["auc"])
    for k in ("auc", "auc_ci", "accuracy", "sensitivity", "specificity", "f1", "brier", "severity_mae",
              "severity_r2", "precision", "recall", "n"):
        assert k in good
    assert good["config"] == dg.make_aggregator("logistic").config   # the settings used are recorded
    assert dg.make_aggregator("transformer").config["members"] == 3  # neural aggregators: ensembles by default
    # both sources were evaluated on the very same folds
    pd.testing.assert_series_equal(results["student_distilled/logistic"].oof["fold"],
                                   results["student_baseline/logistic"].oof["fold"])


@pytest.mark.parametrize("agg,cfg", [("transformer", FAST_TF), ("mlp", {"epochs": 100})])
def test_neural_aggregators_learn_and_are_deterministic(cohort, agg, cfg):
    table, labels = cohort
    r1 = dg.cross_validate(table, labels, agg, folds=3, seed=1, config=cfg)
    assert r1.metrics["auc"] > 0.75
    assert r1.metrics["severity_r2"] > 0.2          # the second head regresses severity
    knees = dg.build_kneeset(table, labels).subset(np.arange(20))
    short = {**cfg, **({"steps": 10} if agg == "transformer" else {"epochs": 10})}
    p1 = dg.make_aggregator(agg, short).fit(knees, seed=3).predict(knees)[0]
    p2 = dg.make_aggregator(agg, short).fit(knees, seed=3).predict(knees)[0]
    np.testing.assert_allclose(p1, p2, rtol=1e-5)


def test_shuffled_labels_give_chance_auc(cohort):
    table, labels = cohort
    rng = np.random.default_rng(0)
    aucs = []
    for s in range(3):
        lab = labels.assign(oa=rng.permutation(labels["oa"].to_numpy()), severity=np.nan)
        aucs.append(dg.cross_validate(table, lab, "logistic", folds=4, seed=s).metrics["auc"])
    # no better than chance out of fold (0.36 here: shuffled labels read a little below 0.5 in small folds); a test
    # fold that leaked into its training knees reads 0.73, which |AUC - 0.5| < 0.2 let through by 0.03 only
    assert 0.2 < np.mean(aucs) < 0.6, aucs


def test_normalisation_uses_training_knees_only(cohort, monkeypatch):
    table, labels = cohort
    seen = []
    orig = Normaliser.fit.__func__

    def spy(cls, knees):
        seen.append(list(knees.subjects))
        return orig(cls, knees)

    monkeypatch.setattr(Normaliser, "fit", classmethod(spy))
    res = dg.cross_validate(table, labels, "logistic", folds=4, seed=0)
    assert len(seen) == 4
    for k, subjects in enumerate(seen):
        test = set(res.oof.loc[res.oof["fold"] == k, "subject"])
        assert not test & set(subjects) and len(subjects) + len(test) == 40


def test_too_few_patients_per_class_is_a_clear_error(cohort):
    table, labels = cohort
    lab = labels.copy()
    keep = lab[lab["oa"] == 0].index.tolist() + lab[lab["oa"] == 1].index[:3].tolist()
    with pytest.raises(UserError, match="too few patients per class.*3 with OA"):
        dg.cross_validate(table, lab.loc[keep], "logistic", folds=5)
    only_oa = lab[lab["oa"] == 1]  # without cross-validation too, every aggregator needs both classes
    for agg in ("logistic", "mlp"):
        with pytest.raises(UserError, match=r"only one class \(\d+ knees with OA, 0 without\)"):
            dg.train(table, only_oa, agg, folds=None)


def test_labelled_knees_without_patch_rows_are_left_out_with_a_warning(cohort):
    """A cohort's labels sheet lists every knee, also those the dataset excluded (registration QA) or kept for
    testing: such a sheet was refused ('labelled knee(s) have no valid patch ... remove them from the labels'). A
    knee without any row in the patch table is now left out, named in a warning; a knee whose rows are all invalid
    is still refused (below), and a table that shares no knee with the labels too."""
    table, labels = cohort
    extra = pd.concat([labels, pd.DataFrame({"subject": ["X1", "X2"], "oa": [1, 0], "severity": [2.0, 0.0]})])
    with pytest.warns(UserWarning, match=r"2 of \d+ labelled knee\(s\) have no row in the patch table \(X1, X2\)"):
        knees = dg.build_kneeset(table, extra)
    assert knees.subjects == dg.build_kneeset(table, labels).subjects
    with pytest.raises(dg.NoValidPatchesError, match="have no valid patch"):
        dg.build_kneeset(table.assign(subject="other"), labels)


def test_sources_missing_different_knees_are_compared_on_the_knees_they_share(cohort):
    """With each table's missing knees left out on its own, two sources were cross-validated on different knees:
    named student_distilled/student_baseline, every cross-validation trained and then the paired test failed ('do
    not cover the same patients'); named otherwise, AUCs over 40 and 39 knees stood side by side. A knee missing
    from any table is now left out of every source, named in one warning, and the comparison stays paired."""
    table, labels = cohort
    tables = {"student_distilled": table, "student_baseline": table[table.subject != "S005"]}
    with pytest.warns(UserWarning, match=r"1 of 40 labelled knee\(s\) have no row in some of the patch tables; "
                                         r"left out of every source.*\(S005\)"):
        block, results = dg.compare_sources(tables, labels, ["logistic"], folds=4)
    assert all(len(r.oof) == 39 for r in results.values())
    assert "p_auc_vs_student_baseline" in block["student_distilled/logistic"]


def test_the_few_knees_warning_counts_the_knees_with_patches(cohort, tmp_path):
    """With a whole cohort's labels and a table of 12 of its knees, `diagnose evaluate` said 'only 40 labelled
    knees' nowhere: it counted the labels sheet. It counts the knees it uses."""
    table, labels = cohort
    keep = sorted(set(table.subject))[:12]
    table[table.subject.isin(keep)].to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.warns(UserWarning) as said:
        assert _cli().main(["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
                            str(tmp_path / "labels.csv"), "--aggregators", "logistic", "--folds", "3",
                            "--out", str(tmp_path / "e")]) == 0
    said = [str(w.message) for w in said]
    assert any(m.startswith("only 12 labelled knees") for m in said), said
    assert any(m.startswith("28 of 40 labelled knee(s) have no row in the patch table") for m in said), said


def test_knee_without_valid_patches(cohort, tmp_path):
    table, labels = cohort
    bad = table.copy()
    bad.loc[bad["subject"] == "S003", "Tb.Th"] = np.nan
    with pytest.raises(dg.NoValidPatchesError, match="S003"):
        dg.cross_validate(bad, labels, "logistic", folds=4)
    model = dg.train(table, labels, "logistic", folds=4)
    pred = dg.predict(model, bad[bad["subject"].isin(["S003", "S004"])])
    row = pred.set_index("subject").loc["S003"]
    assert np.isnan(row["oa_probability"]) and np.isnan(row["severity"]) and "no valid patch" in row["message"]
    assert np.isfinite(pred.set_index("subject").loc["S004", "oa_probability"])


def test_bad_inputs_are_user_errors(cohort):
    table, labels = cohort
    with pytest.raises(UserError, match="lacks the column"):
        dg.cross_validate(table.drop(columns="rel_z"), labels, "logistic")
    with pytest.raises(UserError, match="'oa' must be 0 or 1"):
        dg.cross_validate(table, labels.assign(oa=2), "logistic")
    with pytest.raises(UserError, match="unknown aggregator"):
        dg.cross_validate(table, labels, "svm")


def test_labels_read_a_spreadsheets_true_false_and_yes_no(tmp_path):
    """A labels sheet saved from a spreadsheet says TRUE/FALSE (or yes/no): it was refused as not 0 or 1."""
    from ctsma.diagnosis.data import check_labels

    f = tmp_path / "labels.csv"
    f.write_text("subject,oa\nA,TRUE\nB,False\nC, yes\nD,no\nE,1\nF,0\n", encoding="utf-8")
    assert check_labels(f)["oa"].tolist() == [1, 0, 1, 0, 1, 0]
    f.write_text("subject,oa\nA,TRUE\nB,maybe\n", encoding="utf-8")
    with pytest.raises(UserError, match="subject 'B' has 'maybe'"):
        check_labels(f)


@pytest.mark.parametrize("agg,cfg", [("logistic", None), ("transformer", {"steps": 4}), ("mlp", {"epochs": 5})])
def test_model_file_round_trip(cohort, tmp_path, agg, cfg):
    table, labels = cohort
    model = dg.train(table, labels, agg, folds=3, seed=2, config=cfg)
    path = dg.save(model, tmp_path / f"{agg}.safetensors")
    back = dg.load(path)
    a, b = dg.predict(model, table), dg.predict(back, table)
    np.testing.assert_allclose(a["oa_probability"], b["oa_probability"], rtol=1e-6)
    np.testing.assert_allclose(a["severity"], b["severity"], rtol=1e-5)
    assert back.cv_metrics["auc"] == pytest.approx(model.cv_metrics["auc"])
    assert (a["cv_auc"] == model.cv_metrics["auc"]).all()
    # no pickles: the file is plain safetensors; a wrong kind is refused
    from ctsma.modelfile import save_model
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["kind"] == "diagnosis"
        if agg == "logistic":
            assert "logistic.coef" in fh.keys()
    other = save_model(tmp_path / "other.safetensors", {"w": np.zeros(2)}, {}, kind="teacher")
    with pytest.raises(ModelFileError, match="'teacher' model"):
        dg.load(other)


def test_model_carries_the_non_oa_reference_range_of_each_roi_mean(tmp_path):
    """The non-OA range a patient report compares a knee with: mean and SD (ddof 1) across the healthy knees' ROI
    means, from a table whose ROI means are known; OA knees and single-knee ROIs give no range."""
    from ctsma import PARAMETERS, ROIS

    rows, labels = [], []
    healthy = {"H1": 0.20, "H2": 0.24, "H3": 0.31}   # BV/TV of each healthy knee's MFC (two patches around it)
    for k, (s, oa) in enumerate([("H1", 0), ("H2", 0), ("H3", 0), ("A1", 1), ("A2", 1), ("A3", 1)]):
        labels.append({"subject": s, "oa": oa, "severity": 0.5 * oa})
        for roi in ROIS:
            if roi == "LTP" and s != "H1" and not oa:
                continue  # LTP: one healthy knee only
            centre = healthy.get(s, 0.9) if roi == "MFC" else 0.3 + 0.01 * k
            for d in (-0.01, 0.01):
                rows.append({"subject": s, "roi": roi, "rel_x": d, "rel_y": 0.0, "rel_z": 0.0, "BV/TV": centre + d,
                             "Tb.Th": 0.7, "Tb.Sp": 1.5, "Tb.N": 0.45})
    with pytest.warns(UserWarning, match=r"2 of 6 labelled knee\(s\) have no valid patch in some ROI \(H2: LTP; H3"):
        model = dg.train(pd.DataFrame(rows), pd.DataFrame(labels), "logistic", folds=None)
    ranges = dg.load(dg.save(model, tmp_path / "m.safetensors")).metadata["reference_ranges"]
    got = {(r["roi"], r["parameter"]): r for r in ranges}
    mfc = got[("MFC", "BV/TV")]
    assert mfc["mean"] == pytest.approx(np.mean(list(healthy.values())))
    assert mfc["sd"] == pytest.approx(np.std(list(healthy.values()), ddof=1)) and mfc["n_knees"] == 3
    assert got[("MFC", "Tb.Th")]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert not any(roi == "LTP" for roi, _ in got)  # one healthy knee: no SD, no range
    assert len(ranges) == (len(ROIS) - 1) * len(PARAMETERS)


def test_cli_train_evaluate_predict(cohort, tmp_path, capsys, monkeypatch):
    import ctsma.cli.main as climain

    if "diagnose" not in climain.SUBCOMMANDS:
        monkeypatch.setattr(climain, "SUBCOMMANDS", [*climain.SUBCOMMANDS, "diagnose"])
    table, labels = cohort
    # a patch-store-like table: parameters under mr_<param>, selected with --prefix
    store_like = table.rename(columns={p: f"mr_{p}" for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")})
    store_like.to_csv(tmp_path / "store.csv", index=False)
    table.to_csv(tmp_path / "p.csv", index=False)
    syn.measured(table, 3.0, seed=1).to_csv(tmp_path / "q.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"regression": {"teacher": {"mean_icc21": 0.8}}}))  # from evaluate
    rc = climain.main(["--quiet", "diagnose", "evaluate", "--patches", f"student_distilled={tmp_path / 'store.csv'}",
                       "--prefix", "student_distilled=mr_",
                       "--patches", f"student_baseline={tmp_path / 'q.csv'}", "--labels", str(tmp_path / "labels.csv"),
                       "--aggregators", "logistic", "--folds", "4", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["regression"] == {"teacher": {"mean_icc21": 0.8}}  # 'ctsma evaluate' wrote it: kept
    assert set(metrics["diagnosis"]) == {"student_distilled/logistic", "student_baseline/logistic"}
    assert "p_auc_vs_student_baseline" in metrics["diagnosis"]["student_distilled/logistic"]
    assert (out / "roc_logistic.png").read_bytes()[:4] == b"\x89PNG"
    assert "| student_distilled | logistic | 40 |" in (out / "diagnosis_table.md").read_text()
    assert len(pd.read_csv(out / "oof_predictions.csv")) == 80

    model = tmp_path / "m.safetensors"
    assert climain.main(["--quiet", "diagnose", "train", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregator", "logistic", "--folds", "4",
                         "--out", str(model)]) == 0
    capsys.readouterr()
    assert climain.main(["diagnose", "predict", "--model", str(model), "--patches", str(tmp_path / "p.csv"),
                         "--out", str(tmp_path / "pred.csv")]) == 0
    shown = capsys.readouterr().out
    assert "cross-validated AUC" in shown and "S039" in shown
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert len(pred["predictions"]) == 40 and pred["model_performance"]["n"] == 40

    assert climain.main(["diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--folds", "25", "--out", str(out)]) == 2
    assert "too few patients per class" in capsys.readouterr().err
    assert climain.main(["diagnose", "train", "--patches", str(tmp_path / "store.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--out", str(model)]) == 2
    assert "carry the prefix(es) mr_: choose one with --prefix, e.g. --prefix mr_" in capsys.readouterr().err
    for action in ("evaluate", "train"):
        assert climain.main(["diagnose", action, "--patches", str(tmp_path / "p.csv"), "--labels",
                             str(tmp_path / "labels.csv"), "--workers", "0", "--out", str(tmp_path / "w0")]) == 2
        assert "--workers must be at least 1, got 0" in capsys.readouterr().err
        assert not (tmp_path / "w0").exists()


def test_cli_says_how_many_patch_subjects_have_no_label(cohort, tmp_path, capsys):
    """Patches of subjects the labels do not list are left out of training and cross-validation, as documented:
    now said, with their number (labels of a part of the cohort passed without a word)."""
    climain = _cli()
    table, labels = cohort
    table.to_csv(tmp_path / "p.csv", index=False)
    labels.iloc[:30].to_csv(tmp_path / "labels.csv", index=False)
    left = sorted(set(table["subject"]) - set(labels["subject"].iloc[:30]))
    assert climain.main(["diagnose", "train", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregator", "logistic", "--no-cv",
                         "--out", str(tmp_path / "m.safetensors")]) == 0
    said = capsys.readouterr()
    assert f"patch table: 10 of 40 subject(s) have no label and are not used ({', '.join(left[:5])} …)" in \
        said.out + said.err
    assert climain.main(["diagnose", "evaluate", "--patches", f"a={tmp_path / 'p.csv'}", "--labels",
                         str(tmp_path / "labels.csv"), "--aggregators", "logistic", "--folds", "3",
                         "--out", str(tmp_path / "ev")]) == 0
    said = capsys.readouterr()
    assert "patch table of a: 10 of 40 subject(s) have no label" in said.out + said.err


@pytest.mark.parametrize("agg", ["transformer", "mlp"])
def test_ensemble_averages_members_and_member0_is_the_single_network(cohort, tmp_path, agg):
    """``members: 3`` predicts the mean of three networks that differ only in their seed; member 0 is exactly the
    network of ``members: 1`` with the same seed, and each member alone is the single network of its seed."""
    table, labels = cohort
    knees = dg.build_kneeset(table, labels).subset(np.arange(24))
    short = {"steps": 10} if agg == "transformer" else {"epochs": 10}
    ens = dg.make_aggregator(agg, {**short, "members": 3}).fit(knees, seed=5)
    singles = [dg.make_aggregator(agg, {**short, "members": 1}).fit(knees, seed=5 + 1000 * i) for i in range(3)]
    outs = [s.predict(knees) for s in singles]
    prob, sev = ens.predict(knees)
    np.testing.assert_allclose(prob, np.mean([o[0] for o in outs], axis=0), rtol=1e-5)
    np.testing.assert_allclose(sev, np.mean([o[1] for o in outs], axis=0), rtol=1e-5)
    assert not np.allclose(outs[0][0], outs[1][0])       # the members differ
    # the members round-trip through the tensors of a model file
    back = dg.make_aggregator(agg, {**short}).load_tensors(ens.tensors())
    assert back.config["members"] == 3
    np.testing.assert_allclose(back.predict(knees)[0], prob, rtol=1e-6)


def test_single_network_file_from_before_ensembles_loads(cohort):
    """Files written before ensembles store one network as ``net.<parameter>``: they load as one member."""
    table, labels = cohort
    knees = dg.build_kneeset(table, labels).subset(np.arange(24))
    single = dg.make_aggregator("mlp", {"epochs": 10, "members": 1}).fit(knees, seed=2)
    legacy = {k.replace("net.0.", "net.", 1): v for k, v in single.tensors().items()}
    assert not any(k.startswith("net.0.") for k in legacy)
    back = dg.make_aggregator("mlp", {"epochs": 10}).load_tensors(legacy)
    assert back.config["members"] == 1
    np.testing.assert_allclose(back.predict(knees)[0], single.predict(knees)[0], rtol=1e-6)
    with pytest.raises(KeyError, match="members"):
        dg.make_aggregator("mlp").load_tensors({k: v for k, v in single.tensors().items() if not k.startswith("net.")})


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3", True])
def test_ensemble_size_must_be_a_positive_whole_number(bad):
    with pytest.raises(UserError, match="'members' must be a whole number"):
        dg.make_aggregator("transformer", {"members": bad})


def test_cross_validations_in_parallel_processes_give_the_same_results(cohort, tmp_path):
    """``workers`` trains the folds of the (source, aggregator) cross-validations in spawned processes: the same
    numbers in the same order as one after the other (every network trains on one thread either way)."""
    table, labels = cohort
    tables = {"student_distilled": table, "student_baseline": syn.measured(table, 1.0, seed=2)}
    cfgs = {"transformer": {"steps": 20, "members": 1}, "mlp": {"epochs": 20, "members": 1}}
    from ctsma import progress

    runs = [dg.compare_sources(tables, labels, ["logistic", "transformer", "mlp"], folds=3, seed=0, configs=cfgs)]
    old = progress._jsonl_path
    progress.configure(jsonl_path=str(tmp_path / "progress.jsonl"))
    try:
        runs.append(dg.compare_sources(tables, labels, ["logistic", "transformer", "mlp"], folds=3, seed=0,
                                       configs=cfgs, workers=2))
    finally:
        progress.configure(jsonl_path=old or "")
    events = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["done"], e["total"]) for e in events] == [("diagnosis cross-validations", i, 6)
                                                                     for i in range(1, 7)]
    (b1, r1), (b2, r2) = runs
    assert list(b1) == list(b2) == [f"{s}/{a}" for s in tables for a in ("logistic", "transformer", "mlp")]
    for k in b1:
        assert {m: v for m, v in b1[k].items() if m != "seconds"} == {m: v for m, v in b2[k].items() if m != "seconds"}
        pd.testing.assert_frame_equal(r1[k].oof, r2[k].oof)
    progress.configure(jsonl_path=str(tmp_path / "cv.jsonl"))
    try:
        one = dg.cross_validate(table, labels, "transformer", folds=3, seed=0, config=cfgs["transformer"], workers=2)
    finally:
        progress.configure(jsonl_path=old or "")
    events = [json.loads(line) for line in (tmp_path / "cv.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["done"], e["total"]) for e in events] == [("diagnosis CV transformer", i, 3)
                                                                     for i in (1, 2, 3)]
    pd.testing.assert_frame_equal(one.oof, r1["student_distilled/transformer"].oof)
    model = dg.train(table, labels, "mlp", folds=3, seed=0, config=cfgs["mlp"], workers=2)
    assert model.cv_metrics == {m: v for m, v in b1["student_distilled/mlp"].items()
                                if m not in ("seconds", "config", "auc_diff_vs_student_baseline",
                                             "auc_diff_ci_vs_student_baseline", "p_auc_vs_student_baseline")}


def _cli():
    import ctsma.cli.main as climain

    return climain


def test_predict_with_a_model_trained_without_severity_labels(cohort, tmp_path, capsys):
    """Labels without a severity column make a model whose cross-validated severity MAE is null: predict and train
    said so instead of failing on it (a TypeError traceback) or printing 'nan'."""
    climain = _cli()
    table, labels = cohort
    table.to_csv(tmp_path / "p.csv", index=False)
    labels[["subject", "oa"]].to_csv(tmp_path / "labels.csv", index=False)
    model = tmp_path / "m.safetensors"
    assert climain.main(["diagnose", "train", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregator", "logistic", "--folds", "4",
                         "--out", str(model)]) == 0
    assert "no severity labels" in capsys.readouterr().err
    assert climain.main(["diagnose", "predict", "--model", str(model), "--patches", str(tmp_path / "p.csv"),
                         "--out", str(tmp_path / "pred.csv")]) == 0
    shown = capsys.readouterr().out
    assert "cross-validated AUC" in shown and "no severity labels" in shown and "nan" not in shown
    assert len(json.loads((tmp_path / "pred.json").read_text())["predictions"]) == 40


def test_evaluate_rerun_with_fewer_aggregators_leaves_no_stale_roc_figure(cohort, tmp_path):
    climain = _cli()
    table, labels = cohort
    table.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "ev"
    args = ["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
            str(tmp_path / "labels.csv"), "--folds", "4", "--out", str(out)]
    assert climain.main(args + ["--aggregators", "logistic,mlp"]) == 0
    assert (out / "roc_mlp.png").is_file()
    (out / "roc_notes.png").write_bytes(b"\x89PNG mine")  # a user's own file is kept
    assert climain.main(args + ["--aggregators", "logistic"]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["diagnosis"]) == {"input/logistic"}
    assert not (out / "roc_mlp.png").exists()  # its curves are no longer in metrics.json or the table
    assert (out / "roc_logistic.png").is_file() and (out / "roc_notes.png").is_file()


def test_numeric_subject_ids_keep_their_leading_zeros(cohort, tmp_path):
    """IDs such as 0007 were read as numbers: predictions named knee '7', and a labels file with one non-numeric ID
    (kept as text) matched none of the patch table's (read as numbers)."""
    climain = _cli()
    table, labels = cohort
    ids = {s: s.replace("S", "00") for s in labels["subject"]}  # S007 -> 00007
    table.assign(subject=table["subject"].map(ids)).to_csv(tmp_path / "p.csv", index=False)
    lab = labels.assign(subject=labels["subject"].map(ids))
    lab.to_csv(tmp_path / "labels.csv", index=False)
    model = tmp_path / "m.safetensors"
    assert climain.main(["--quiet", "diagnose", "train", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregator", "logistic", "--folds", "4",
                         "--out", str(model)]) == 0
    assert climain.main(["--quiet", "diagnose", "predict", "--model", str(model), "--patches", str(tmp_path / "p.csv"),
                         "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"subject": str})
    assert sorted(pred["subject"]) == sorted(ids.values())
    t2 = pd.read_csv(tmp_path / "p.csv", dtype={"subject": str})  # plus an unlabelled knee whose ID is not a number
    t2 = pd.concat([t2, t2[t2["subject"] == t2["subject"].iloc[0]].assign(subject="X-extra")])
    t2.to_csv(tmp_path / "p2.csv", index=False)
    assert climain.main(["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p2.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregators", "logistic", "--folds", "4",
                         "--out", str(tmp_path / "ev")]) == 0


def test_evaluate_refuses_two_prefixes_for_one_source(cohort, tmp_path, capsys):
    """`--prefix a=mr_ --prefix a=true_` silently evaluated the last prefix's columns only."""
    climain = _cli()
    table, labels = cohort
    both = table.rename(columns={p: f"mr_{p}" for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")})
    both = both.assign(**{f"true_{p}": table[p] for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")})
    both.to_csv(tmp_path / "store.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    assert climain.main(["diagnose", "evaluate", "--patches", f"a={tmp_path / 'store.csv'}", "--prefix", "a=mr_",
                         "--prefix", "a=true_", "--labels", str(tmp_path / "labels.csv"), "--aggregators", "logistic",
                         "--folds", "4", "--out", str(tmp_path / "ev")]) == 2
    assert "more than one prefix" in capsys.readouterr().err and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("agg,cfg", [("logistic", None), ("mlp", {"epochs": 5, "members": 1}),
                                     ("transformer", {"steps": 4, "members": 1})])
def test_no_probability_for_a_knee_without_patches_in_one_roi(cohort, agg, cfg):
    """Every aggregator learnt from knees with all four ROIs. predict gave a knee without MTP patches a probability
    all the same (the ROI-mean models filled MTP with the training mean, the transformer read a knee unlike any it
    learnt from), while 'ctsma infer' refused such a knee: now neither gives one, and the message names the ROI."""
    table, labels = cohort
    model = dg.train(table, labels, agg, folds=None, config=cfg)
    part = table[~((table["subject"] == "S003") & (table["roi"] == "MTP"))]
    part = part.copy()
    part.loc[(part["subject"] == "S005") & part["roi"].isin(["MFC", "LFC"]), "Tb.N"] = np.nan  # invalid patches
    pred = dg.predict(model, part).set_index("subject")
    for s, rois in (("S003", "MTP"), ("S005", "MFC, LFC")):
        row = pred.loc[s]
        assert np.isnan(row["oa_probability"]) and np.isnan(row["severity"]) and pd.isna(row["oa_predicted"])
        assert row["message"].startswith(f"ROI(s) {rois} have no valid patch") and "no diagnosis" in row["message"]
        assert row["n_patches"] == (len(part[part["subject"] == s]) - (12 if s == "S005" else 0))
    rest = pred.drop(index=["S003", "S005"])
    assert rest["oa_probability"].between(0, 1).all() and (rest["message"] == "").all()
    # the other knees' probabilities are those of a prediction without the incomplete knees
    alone = dg.predict(model, table[~table["subject"].isin(["S003", "S005"])]).set_index("subject")
    np.testing.assert_allclose(rest["oa_probability"], alone["oa_probability"], rtol=1e-6)


def test_no_probability_for_a_knee_whose_parameters_lie_outside_every_training_knee(cohort):
    """Tb.Th and Tb.Sp in µm (or another student's scale) gave a confident probability of nothing (1.000 and a
    severity of 1290 on the demo's model): a knee whose ROI means lie FOREIGN_Z non-OA SDs from the model's non-OA
    means now gets none, saying why; the training knees themselves, OA or not, all get one."""
    table, labels = cohort
    model = dg.train(table, labels, "logistic", folds=None)
    assert dg.predict(model, table)["oa_probability"].notna().all()
    odd = table.copy()
    um = odd["subject"] == "S004"
    odd.loc[um, ["Tb.Th", "Tb.Sp"]] *= 1000.0
    pred = dg.predict(model, odd).set_index("subject")
    row = pred.loc["S004"]
    assert np.isnan(row["oa_probability"]) and np.isnan(row["severity"])
    assert "outside every knee the diagnosis model learnt from" in row["message"] and "no diagnosis" in row["message"]
    assert pred.drop(index="S004")["oa_probability"].notna().all()


def test_cli_predict_gives_each_incomplete_knee_a_row_without_probability(cohort, tmp_path, capsys):
    """`ctsma diagnose predict` over a table holding a knee without LTP patches: the batch is not aborted, that
    knee's row has no probability and names LTP (CSV, JSON and the printed table), the others are predicted."""
    climain = _cli()
    table, labels = cohort
    table.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    table[~((table["subject"] == "S007") & (table["roi"] == "LTP"))].to_csv(tmp_path / "new.csv", index=False)
    model = tmp_path / "m.safetensors"
    assert climain.main(["--quiet", "diagnose", "train", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregator", "logistic", "--no-cv", "--out", str(model)]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"1 of 40 knee\(s\) got no OA probability \(S007\)"):
        assert climain.main(["diagnose", "predict", "--model", str(model), "--patches", str(tmp_path / "new.csv"),
                             "--out", str(tmp_path / "pred.csv")]) == 0
    assert "ROI(s) LTP have no valid patch" in capsys.readouterr().out
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"subject": str}).set_index("subject")
    assert np.isnan(pred.loc["S007", "oa_probability"]) and "LTP" in pred.loc["S007", "message"]
    assert pred.drop(index="S007")["oa_probability"].notna().all()
    rec = {r["subject"]: r for r in json.loads((tmp_path / "pred.json").read_text())["predictions"]}
    assert rec["S007"]["oa_probability"] is None and "LTP" in rec["S007"]["message"]


def test_out_of_fold_severity_is_empty_without_severity_labels(cohort, tmp_path):
    """Labels without severity gave every knee of oof_predictions.csv a predicted severity of 0.0 (the untrained
    head's constant), beside a null severity MAE; predict gives such a model's knees no severity."""
    climain = _cli()
    table, labels = cohort
    table.to_csv(tmp_path / "p.csv", index=False)
    labels[["subject", "oa"]].to_csv(tmp_path / "labels.csv", index=False)
    assert climain.main(["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
                         str(tmp_path / "labels.csv"), "--aggregators", "logistic", "--folds", "4",
                         "--out", str(tmp_path / "ev")]) == 0
    oof = pd.read_csv(tmp_path / "ev" / "oof_predictions.csv")
    assert oof["oa_probability"].notna().all() and oof["severity_pred"].isna().all()
    one = labels.assign(severity=np.where(np.arange(len(labels)) == 0, labels["severity"], np.nan))
    res = dg.cross_validate(table, one, "logistic", folds=4)  # one severity label: no fold learns severity
    assert res.oof["severity_pred"].isna().all() and np.isnan(res.metrics["severity_mae"])
    full = dg.cross_validate(table, labels, "logistic", folds=4)
    assert full.oof["severity_pred"].notna().all()


def test_evaluate_stopped_while_writing_leaves_no_mixed_results(cohort, tmp_path, monkeypatch):
    """A rerun killed after it had merged its diagnosis block into metrics.json but before it had written the
    out-of-fold predictions left the new block (and table) beside the earlier run's oof_predictions.csv and ROC
    figures; `ctsma evaluate`'s blocks in the same metrics.json must survive either way."""
    from ctsma.diagnosis import report

    climain = _cli()
    table, labels = cohort
    table.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"regression": {"teacher": {"mean_icc21": 0.8}}}))
    args = ["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
            str(tmp_path / "labels.csv"), "--folds", "4", "--out", str(out)]
    assert climain.main(args + ["--aggregators", "logistic,mlp"]) == 0

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for a SIGKILL between two of the files

    monkeypatch.setattr(report, "write_oof", killed)
    assert climain.main(args + ["--aggregators", "logistic"]) == 130
    metrics = json.loads((out / "metrics.json").read_text())
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert metrics["regression"] == {"teacher": {"mean_icc21": 0.8}}
    assert set(metrics.get("diagnosis", {})) in (set(), set(oof["source"] + "/" + oof["aggregator"]))
    monkeypatch.undo()
    assert climain.main(args + ["--aggregators", "logistic"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert set(metrics["diagnosis"]) == set(oof["source"] + "/" + oof["aggregator"]) == {"input/logistic"}
    assert "regression" in metrics and not list(out.glob(".*partial*"))


def test_messages_on_a_table_that_is_not_a_patch_table_and_on_a_bad_oa_label(cohort, tmp_path, capsys):
    """`ctsma evaluate`'s regression_predictions.csv (subject, mr_<param>, teacher_<param>, no roi or position) given
    with --prefix teacher_ was called 'a patch store table' to be read with an mr_ or true_ prefix; and a label
    such as 'maybe' or an empty oa cell was refused without saying what the cell held."""
    climain = _cli()
    table, labels = cohort
    preds = table[["subject"]].assign(**{f"{s}_{p}": table[p] for s in ("mr", "teacher")
                                         for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")})
    preds.to_csv(tmp_path / "regression_predictions.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    base = ["diagnose", "train", "--labels", str(tmp_path / "labels.csv"), "--aggregator", "logistic",
            "--out", str(tmp_path / "m.safetensors")]
    assert climain.main(base + ["--patches", str(tmp_path / "regression_predictions.csv"), "--prefix",
                                "teacher_"]) == 2
    err = capsys.readouterr().err
    assert "lacks the column(s) roi, rel_x, rel_y, rel_z" in err and "patch store" not in err
    table.to_csv(tmp_path / "p.csv", index=False)
    for value, said in (("maybe", "has 'maybe'"), ("", "has none"), ("2", "has '2'")):
        lab = labels.astype({"oa": object})
        lab.loc[3, "oa"] = value
        lab.to_csv(tmp_path / "bad.csv", index=False)
        assert climain.main(base[:2] + ["--patches", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "bad.csv"),
                                        "--out", str(tmp_path / "m.safetensors")]) == 2
        assert f"(subject {labels.subject[3]!r} {said})" in capsys.readouterr().err


def test_a_regression_predictions_table_without_a_prefix_names_its_own_prefixes(cohort, tmp_path, capsys):
    """`ctsma evaluate`'s regression_predictions.csv (subject, index, roi, rel_x/y/z, mr_<param>, teacher_<param>,
    student_distilled_<param>, ...) given without --prefix was called 'a patch store table' to be read 'with an mr_ or
    true_ prefix': following that trained the diagnosis on the MR reference instead of the student. The message
    names the table's own prefixes, and a wrong prefix lists them too."""
    climain = _cli()
    table, labels = cohort
    sources = ("mr", "teacher", "student_distilled", "student_baseline", "ct_direct")
    preds = table[["subject", "roi", "rel_x", "rel_y", "rel_z"]].assign(
        **{f"{s}_{p}": table[p] for s in sources for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")})
    preds.to_csv(tmp_path / "regression_predictions.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    base = ["diagnose", "train", "--labels", str(tmp_path / "labels.csv"), "--aggregator", "logistic", "--no-cv",
            "--out", str(tmp_path / "m.safetensors"), "--patches", str(tmp_path / "regression_predictions.csv")]
    assert climain.main(base) == 2
    err = capsys.readouterr().err
    assert "mr_ or true_" not in err and "patch store" not in err
    assert ("prefix(es) mr_, teacher_, student_distilled_, student_baseline_, ct_direct_: choose one with --prefix, "
            "e.g. --prefix student_distilled_") in err
    assert climain.main(base + ["--prefix", "student_"]) == 2
    assert "(its prefixes: mr_, teacher_, student_distilled_, student_baseline_, ct_direct_)" in capsys.readouterr().err
    assert climain.main(base + ["--prefix", "student_distilled_"]) == 0


def test_train_and_evaluate_warn_about_knees_without_an_roi(cohort, tmp_path):
    """A patch table without any MTP patch trained and cross-validated without a word (beside numpy's 'Mean of empty
    slice' warnings), giving a model with a cross-validated AUC that refuses every such knee in predict."""
    import warnings

    climain = _cli()
    table, labels = cohort
    table[table["roi"] != "MTP"].to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    common = ["--quiet", "diagnose", "train", "--patches", str(tmp_path / "p.csv"), "--labels",
              str(tmp_path / "labels.csv"), "--folds", "4", "--aggregator", "logistic"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert climain.main(common + ["--source", "mine", "--out", str(tmp_path / "m.safetensors")]) == 0
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and said[0].startswith("mine: 40 of 40 labelled knee(s) have no valid patch in some ROI "
                                                 "(S000: MTP;"), said  # and no numpy 'Mean of empty slice'
    ev = ["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
          str(tmp_path / "labels.csv"), "--folds", "4", "--aggregators", "logistic", "--out", str(tmp_path / "ev")]
    with pytest.warns(UserWarning, match=r"input: 40 of 40 labelled knee\(s\) have no valid patch in some ROI"):
        assert climain.main(ev) == 0
    table.to_csv(tmp_path / "p.csv", index=False)  # knees with all four ROIs: no warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert climain.main(common + ["--out", str(tmp_path / "m.safetensors")]) == 0
    assert not seen, [str(w.message) for w in seen]


def test_an_aggregator_named_twice_is_cross_validated_once(cohort, monkeypatch):
    """`--aggregators logistic,logistic` (or the demo's `aggregators: [logistic, logistic]`) ran each of its
    cross-validations twice, for one entry in the results."""
    from ctsma.diagnosis import evaluation

    table, labels = cohort
    calls = []
    real = evaluation.cross_validate
    monkeypatch.setattr(evaluation, "cross_validate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    block, _ = dg.compare_sources({"a": table}, labels, ["logistic", "logistic"], folds=4)
    assert calls == ["logistic"] and list(block) == ["a/logistic"]


def test_few_knees_warning_gives_what_one_knee_of_the_smaller_class_moves(cohort, tmp_path):
    """With 12 knees of which 3 have OA, the warning said one knee moves an AUC by up to 0.17 (1 / (n // 2), as if
    the classes were even); one OA knee moved from the top of the ranking to the bottom moves it by 1/3."""
    climain = _cli()
    table, labels = cohort
    lab = pd.concat([labels[labels.oa == 1].head(3), labels[labels.oa == 0].head(9)])
    table.to_csv(tmp_path / "p.csv", index=False)
    lab.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.warns(UserWarning, match=r"only 12 labelled knees: .* by up to 0\.33\)"):
        assert climain.main(["--quiet", "diagnose", "evaluate", "--patches", str(tmp_path / "p.csv"), "--labels",
                             str(tmp_path / "labels.csv"), "--aggregators", "logistic", "--folds", "3",
                             "--out", str(tmp_path / "ev")]) == 0
