"""Patient-level k-fold cross-validation and the comparison of parameter sources.

Folds are stratified by OA label over PATIENTS (all patches of a knee stay in one fold) and depend
only on the subjects, their labels and the seed, so every source and aggregator is evaluated on the
very same splits; that makes their out-of-fold AUCs paired and the DeLong test applicable.
Metrics are computed on the pooled out-of-fold predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import progress, stats
from ..errors import UserError
from ..progress import track
from .aggregators import make_aggregator
from .data import (KneeSet, build_kneeset, check_patch_table, labels_in_every_table, read_table,
                   warn_incomplete_knees)

DEFAULT_FOLDS = 5
DEFAULT_SEED = 0


@dataclass
class CVResult:
    """Out-of-fold predictions (one row per patient) and the metrics computed from them."""

    source: str
    aggregator: str
    oof: pd.DataFrame
    metrics: dict
    folds: int
    seed: int
    seconds: float
    config: dict = field(default_factory=dict)


def fold_assignment(knees: KneeSet, folds: int, seed: int) -> np.ndarray:
    """Stratified patient-level fold index per knee; a clear error when a class is too small."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise UserError(f"cross-validation needs at least 2 folds, got {folds}")
    counts = {c: int(np.sum(knees.oa == c)) for c in (0, 1)}
    if min(counts.values()) < folds:
        raise UserError(
            f"too few patients per class for {folds}-fold cross-validation: {counts[1]} with OA and "
            f"{counts[0]} without; each class needs at least {folds} patients (use fewer folds or more patients)")
    assign = np.empty(len(knees), int)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(skf.split(np.zeros(len(knees)), knees.oa)):
        assign[test] = k
    return assign


def score(oa, prob, severity=None, severity_pred=None) -> dict:
    """The contract's diagnosis block (plus precision, recall, n and the AUC SE) from predictions."""
    oa = np.asarray(oa, int)
    prob = np.asarray(prob, float)
    auc = stats.auc_delong(oa, prob)
    m = stats.binary_metrics(oa, prob)
    out = {"auc": auc.auc, "auc_ci": list(auc.ci), "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
           "specificity": m["specificity"], "f1": m["f1"], "brier": m["brier"], "severity_mae": float("nan"),
           "severity_r2": float("nan"), "precision": m["precision"], "recall": m["recall"], "auc_se": auc.se,
           "n": int(oa.size), "n_oa": int(oa.sum()), "auc_ci_method": "DeLong"}
    if severity is not None and severity_pred is not None:
        sev, pred = np.asarray(severity, float), np.asarray(severity_pred, float)
        ok = np.isfinite(sev) & np.isfinite(pred)
        if ok.sum() >= 2:
            r = stats.regression_metrics(sev[ok], pred[ok])
            out["severity_mae"], out["severity_r2"] = r["mae"], r["r2"]
    return out


def severity_trained(knees: KneeSet) -> bool:
    """Whether ``knees`` hold the two or more severity labels a severity model learns from (else every aggregator
    predicts a constant, which a model file and the out-of-fold table give as no severity)."""
    return knees.severity is not None and int(np.isfinite(knees.severity).sum()) >= 2


def _fold_job(aggregator: str, config: dict | None, train: KneeSet, test: KneeSet, seed: int):
    """Fit on one fold's training knees, predict its test knees: (probabilities, severities, seconds)."""
    t0 = time.perf_counter()
    model = make_aggregator(aggregator, config).fit(train, seed=seed)
    prob, sev = model.predict(test)
    if not severity_trained(train):  # the severity head learnt nothing: its output (a constant) is no prediction
        sev = np.full(len(test), np.nan)
    return prob, sev, time.perf_counter() - t0


def _fold_jobs(knees: KneeSet, aggregator: str, folds: int, seed: int, config: dict | None):
    """The fold assignment and one :func:`_fold_job` argument tuple per fold (fold ``k`` trains with ``seed + k``)."""
    assign = fold_assignment(knees, folds, seed)
    return assign, [(aggregator, config, knees.subset(np.flatnonzero(assign != k)),
                     knees.subset(np.flatnonzero(assign == k)), seed + k) for k in range(folds)]


def _cv_result(knees: KneeSet, assign, outs, aggregator, folds, seed, source, config, seconds) -> CVResult:
    prob = np.full(len(knees), np.nan)
    sev = np.full(len(knees), np.nan)
    for k, (p, s, _) in enumerate(outs):
        test = np.flatnonzero(assign == k)
        prob[test], sev[test] = p, s
    oof = pd.DataFrame({"subject": knees.subjects, "fold": assign, "oa": knees.oa, "severity": knees.severity,
                        "oa_probability": prob, "severity_pred": sev})
    metrics = score(knees.oa, prob, knees.severity, sev)
    metrics.update({"folds": folds, "seed": seed})
    cfg = make_aggregator(aggregator, config).config
    return CVResult(source, aggregator, oof, metrics, folds, seed, seconds, cfg)


def cross_validate(patch_table, labels, aggregator: str = "transformer", folds: int = DEFAULT_FOLDS,
                   seed: int = DEFAULT_SEED, *, source: str = "", config: dict | None = None,
                   knees: KneeSet | None = None, workers: int = 1) -> CVResult:
    """Patient-level stratified k-fold CV of one aggregator on one patch table.

    Returns per-patient out-of-fold OA probabilities and severities (``result.oof``) and the metrics
    (``result.metrics``: auc, auc_ci, accuracy, sensitivity, specificity, f1, brier, severity_mae,
    severity_r2, precision, recall, n, ...). Normalisation is fitted inside each training fold. ``workers`` > 1
    trains the folds in that many spawned processes; every network trains on one thread either way, so the
    results are the same.
    """
    from ..processes import run_jobs

    t0 = time.perf_counter()
    knees = knees if knees is not None else build_kneeset(patch_table, labels)
    assign, jobs = _fold_jobs(knees, aggregator, folds, seed, config)
    stage = f"diagnosis CV {source + '/' if source else ''}{aggregator}"
    if workers > 1:
        done = []

        def report(i: int, out) -> None:
            done.append(i)
            progress.step(stage, len(done), folds, f"  {stage}: fold {i + 1} of {folds} done ({out[2]:.0f} s)")

        outs = run_jobs(_fold_job, jobs, workers, on_done=report)
    else:
        outs = [_fold_job(*job) for job in track(jobs, stage, total=folds, unit="fold")]
    return _cv_result(knees, assign, outs, aggregator, folds, seed, source, config, time.perf_counter() - t0)


AGGREGATOR_COST = ("transformer", "mlp", "logistic")  # slowest first: the order in which parallel jobs start


def compare_sources(tables: Mapping[str, object], labels, aggregators: Sequence[str] = ("transformer", "mlp",
                    "logistic"), folds: int = DEFAULT_FOLDS, seed: int = DEFAULT_SEED, *,
                    pairs: Sequence[tuple[str, str]] = (("student_distilled", "student_baseline"),),
                    configs: Mapping[str, dict] | None = None, workers: int = 1) -> tuple[dict, dict[str, CVResult]]:
    """Cross-validate every aggregator on every source with the same patient folds.

    ``tables`` maps a source name (student_distilled, student_baseline, mr_reference, truth, ...) to its
    patch table. Returns ``(diagnosis_block, results)``: the block maps ``"<source>/<aggregator>"`` to
    its metrics (with the aggregator's ``config``, e.g. its ``members``, and ``seconds``: the wall time of the
    cross-validation, or with ``workers`` > 1 the summed time of its folds); for each ``(a, b)`` in ``pairs``
    present in ``tables``, the entry of ``a`` gains ``auc_diff_vs_<b>``, ``auc_diff_ci_vs_<b>`` and
    ``p_auc_vs_<b>`` (two-sided DeLong test of the paired AUCs). All sources are evaluated on the same patients
    and folds, so the comparison is paired: a labelled knee missing from some table (no row in it) is left out of
    every source, with one warning naming it, and a labelled knee whose rows are all invalid is a clear error. ``workers`` > 1 trains all the folds of all the cross-validations in that many
    spawned processes, slowest aggregator first; every network trains on one thread either way, so the results
    are the same.
    """
    from ..processes import run_jobs

    aggregators = list(dict.fromkeys(aggregators))  # "logistic,logistic" cross-validated it twice, for one entry
    lab = read_table(labels, "labels")
    tables = {s: check_patch_table(t, f"patch table of {s}") for s, t in tables.items()}
    lab = labels_in_every_table(lab, tables)
    knees_by_source = {s: build_kneeset(t, lab) for s, t in tables.items()}
    for s, knees in knees_by_source.items():
        warn_incomplete_knees(knees, s)
    keys = [(src, agg) for src in knees_by_source for agg in aggregators]
    finished: dict[tuple[str, str], CVResult] = {}
    if workers > 1:
        rank = {a: i for i, a in enumerate(AGGREGATOR_COST)}
        plan = {(src, agg): _fold_jobs(knees_by_source[src], agg, folds, seed, (configs or {}).get(agg))
                for src, agg in sorted(keys, key=lambda k: rank.get(k[1], 0))}
        flat = [(key, job) for key, (_, jobs) in plan.items() for job in jobs]
        indices: dict[tuple[str, str], list[int]] = {}
        for j, (key, _) in enumerate(flat):
            indices.setdefault(key, []).append(j)
        outs: dict[int, tuple] = {}

        def done(i: int, out) -> None:  # a cross-validation is assembled once its last fold is in
            outs[i] = out
            src, agg = key = flat[i][0]
            mine = indices[key]
            if all(j in outs for j in mine):
                r = _cv_result(knees_by_source[src], plan[key][0], [outs[j] for j in mine], agg, folds, seed, src,
                               (configs or {}).get(agg), sum(outs[j][2] for j in mine))
                finished[key] = r
                progress.step("diagnosis cross-validations", len(finished), len(plan),
                              f"  diagnosis CV {src}/{agg}: AUC {r.metrics['auc']:.3f} ({r.seconds:.0f} s in "
                              f"{folds} folds)")

        run_jobs(_fold_job, [job for _, job in flat], workers, on_done=done)
    else:
        for src, agg in keys:
            finished[src, agg] = cross_validate(None, None, agg, folds, seed, source=src, knees=knees_by_source[src],
                                                config=(configs or {}).get(agg))
    results: dict[str, CVResult] = {}
    block: dict[str, dict] = {}
    for src, agg in keys:
        r = finished[src, agg]
        results[f"{src}/{agg}"] = r
        block[f"{src}/{agg}"] = dict(r.metrics, seconds=r.seconds, config=dict(r.config))
    for a, b in pairs:
        for agg in aggregators:
            ka, kb = f"{a}/{agg}", f"{b}/{agg}"
            if ka in results and kb in results:
                t = paired_auc_test(results[ka], results[kb])
                block[ka].update({f"auc_diff_vs_{b}": t.diff, f"auc_diff_ci_vs_{b}": list(t.diff_ci),
                                  f"p_auc_vs_{b}": t.p})
    return block, results


def paired_auc_test(a: CVResult, b: CVResult) -> stats.DeLongTest:
    """DeLong test of two CV results on the same patients (matched by subject)."""
    m = a.oof.merge(b.oof, on="subject", suffixes=("_a", "_b"))
    if len(m) != len(a.oof) or len(m) != len(b.oof):
        raise UserError("the two cross-validations do not cover the same patients; a paired AUC test needs them")
    return stats.delong_test(m["oa_a"], m["oa_probability_a"], m["oa_probability_b"])
