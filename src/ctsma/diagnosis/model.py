"""Train, save, load and apply a diagnosis model.

The model file is a CT-SMA model file (``kind="diagnosis"``): safetensors tensors (network weights, or
the logistic/ridge coefficients, plus the normalisation statistics) and JSON metadata holding the
aggregator, its settings, the parameter names/units/ROI order it expects, the training summary, the
model's cross-validated performance, which predictions report beside each probability, and the non-OA
reference range of each ROI mean in its training cohort, which patient reports compare a knee with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import PARAMETERS, PARAMETER_UNITS
from ..errors import ModelFileError, UserError
from ..modelfile import load_model, save_model
from .aggregators import AGGREGATORS, Aggregator, make_aggregator
from .data import (NO_VALID_PATCH, REFERENCE_DESCRIPTION, ROI_ORDER, build_kneeset, check_patch_table,
                   incomplete_knee_message, knees_without_patches, reference_ranges, rois_without_patches,
                   warn_incomplete_knees)
from .evaluation import DEFAULT_FOLDS, DEFAULT_SEED, cross_validate, severity_trained

KIND = "diagnosis"


@dataclass
class DiagnosisModel:
    aggregator: Aggregator
    metadata: dict

    @property
    def cv_metrics(self) -> dict:
        return self.metadata.get("cv_metrics") or {}


def train(patch_table, labels, aggregator: str = "transformer", *, seed: int = DEFAULT_SEED,
          folds: int | None = DEFAULT_FOLDS, source: str = "", config: dict | None = None,
          workers: int = 1) -> DiagnosisModel:
    """Cross-validate (unless ``folds`` is None; its folds in ``workers`` processes), then fit on all labelled
    knees."""
    knees = build_kneeset(patch_table, labels)
    warn_incomplete_knees(knees, source)
    n_oa = int(np.sum(knees.oa))
    if n_oa in (0, len(knees)):  # a classifier needs both classes, with or without cross-validation
        raise UserError(f"the labels hold only one class ({n_oa} knees with OA, {len(knees) - n_oa} without); "
                        "a diagnosis model needs both")
    cv = None
    if folds:
        cv = cross_validate(None, None, aggregator, folds, seed, source=source, knees=knees, config=config,
                            workers=workers)
    agg = make_aggregator(aggregator, config).fit(knees, seed=seed)
    meta = {
        "aggregator": aggregator, "config": agg.config, "source": source, "seed": seed,
        "parameters": list(PARAMETERS), "units": {p: PARAMETER_UNITS[p] for p in PARAMETERS},
        "rois": list(ROI_ORDER), "n_train": len(knees), "n_train_oa": int(knees.oa.sum()),
        "severity_trained": severity_trained(knees),
        "cv_metrics": None if cv is None else cv.metrics,
        "cv_description": None if cv is None else
        f"{folds}-fold patient-level stratified cross-validation, seed {seed}, pooled out-of-fold predictions",
        "reference_ranges": reference_ranges(knees), "reference_description": REFERENCE_DESCRIPTION,
    }
    return DiagnosisModel(agg, meta)


def save(model: DiagnosisModel, path) -> Path:
    """Write the model atomically as a ``diagnosis`` CT-SMA model file (no pickles)."""
    return save_model(path, model.aggregator.tensors(), model.metadata, kind=KIND)


def load(path) -> DiagnosisModel:
    """Read a model written by :func:`save`, refusing other kinds and altered files."""
    tensors, meta = load_model(path, kind=KIND)
    if meta.get("aggregator") not in AGGREGATORS:
        raise ModelFileError(f"{Path(path).name}: unknown aggregator {meta.get('aggregator')!r}")
    if list(meta.get("parameters", [])) != list(PARAMETERS) or list(meta.get("rois", [])) != list(ROI_ORDER):
        raise ModelFileError(f"{Path(path).name} expects parameters {meta.get('parameters')} and ROIs "
                             f"{meta.get('rois')}, which this CT-SMA does not provide")
    try:
        agg = make_aggregator(meta["aggregator"], meta.get("config")).load_tensors(
            {k: v.numpy() if k.startswith("norm.") or not k.startswith("net.") else v for k, v in tensors.items()})
    except (KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{Path(path).name} does not match its declared architecture: {exc}") from None
    return DiagnosisModel(agg, meta)


def predict(model: DiagnosisModel, patch_table, subjects=None) -> pd.DataFrame:
    """One row per knee: ``subject, n_patches, oa_probability, oa_predicted, severity, message``.

    Knees listed in ``subjects`` (default: every subject in the table) without a valid patch, or without one in
    any of the four ROIs, get an empty probability and severity and a message saying why (naming the ROIs),
    never a made-up value: every aggregator learnt from knees with all four ROIs (the ROI-mean models would fill
    a missing ROI's features with the training mean, the transformer would see a knee unlike any it learnt
    from). Nor do knees whose ROI means lie outside every knee the model learnt from (:func:`out_of_domain`).
    This is the one rule for ``ctsma diagnose predict`` and ``ctsma infer``. The model's
    cross-validated AUC (with CI), accuracy and severity MAE are added as columns ``cv_*``.
    """
    patches = check_patch_table(patch_table)
    wanted = sorted(set(patches["subject"])) if subjects is None else [str(s) for s in subjects]
    empty = set(knees_without_patches(patches, wanted))
    incomplete = rois_without_patches(patches, wanted)
    n_valid = patches.loc[patches["valid"]].groupby("subject").size()
    rows = []
    ok_subjects = [s for s in wanted if s not in empty and s not in incomplete]
    foreign: dict = {}
    if ok_subjects:
        knees = build_kneeset(patches[patches["subject"].isin(ok_subjects)].drop(columns="valid"))
        foreign = out_of_domain(model, knees)
        prob, sev = model.aggregator.predict(knees)
        n = dict(zip(knees.subjects, (len(p) for p in knees.params)))
        res = dict(zip(knees.subjects, zip(prob, sev)))
    for s in wanted:
        if s in empty or s in incomplete or s in foreign:
            why = (incomplete_knee_message(incomplete[s]) if s in incomplete else
                   foreign[s] if s in foreign else NO_VALID_PATCH)
            rows.append({"subject": s, "n_patches": int(n_valid.get(s, 0)), "oa_probability": np.nan,
                         "oa_predicted": None, "severity": np.nan, "message": why})
        else:
            p, v = res[s]
            if not model.metadata.get("severity_trained", True):
                v = np.nan
            rows.append({"subject": s, "n_patches": n[s], "oa_probability": float(p), "oa_predicted": int(p >= 0.5),
                         "severity": float(v), "message": ""})
    out = pd.DataFrame(rows)
    out["oa_predicted"] = out["oa_predicted"].astype("Int64")
    cv = model.cv_metrics
    out["cv_auc"] = cv.get("auc", np.nan)
    ci = cv.get("auc_ci") or [np.nan, np.nan]
    out["cv_auc_ci_low"], out["cv_auc_ci_high"] = ci[0], ci[1]
    out["cv_accuracy"] = cv.get("accuracy", np.nan)
    out["cv_severity_mae"] = cv.get("severity_mae", np.nan)
    return out


FOREIGN_Z = 20.0
"""An ROI mean this many non-OA SDs from the model's non-OA mean lies outside every knee the model learnt from: the
demo's 36 knees, OA or not, lie within 7.9 of them (distilled student), while Tb.Th or Tb.Sp in µm lie 10⁴ away and
another student's scale (the true Tb.Th of about 0.25 mm for the MR-apparent 0.74) about 28."""


def out_of_domain(model: DiagnosisModel, knees) -> dict:
    """``{subject: message}`` for the knees whose ROI means lie :data:`FOREIGN_Z` or more of the model's non-OA
    SDs (its ``reference_ranges``) from their means: parameters in another unit, or from a student of another
    scale, which the model would turn into a confident and meaningless probability. A model without reference
    ranges checks nothing."""
    ref = {(r["roi"], r["parameter"]): (r["mean"], r["sd"]) for r in model.metadata.get("reference_ranges") or []
           if r.get("sd")}
    out = {}
    for i, s in enumerate(knees.subjects):
        worst = None
        for j, (roi, p) in enumerate((roi, p) for roi in ROI_ORDER for p in PARAMETERS):
            if (roi, p) in ref and np.isfinite(knees.roi_means[i, j]):
                mean, sd = ref[(roi, p)]
                z = (knees.roi_means[i, j] - mean) / sd
                if abs(z) >= FOREIGN_Z and (worst is None or abs(z) > abs(worst[0])):
                    worst = (z, roi, p, knees.roi_means[i, j], mean, sd)
        if worst:
            z, roi, p, v, mean, sd = worst
            unit = PARAMETER_UNITS.get(p, "")
            out[str(s)] = (f"its ROI means lie outside every knee the diagnosis model learnt from ({roi} {p} {v:.4g} "
                           f"{unit} against the non-OA {mean:.3g} ± {sd:.2g}: {z:+.0f} SD): parameters in another "
                           "unit, or from a student of another scale? no diagnosis")
    return out
