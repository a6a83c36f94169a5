"""Input checking and feature building for patient-level diagnosis.

A **patch table** has one row per patch: ``subject``, ``roi`` (MFC/LFC/MTP/LTP), ``rel_x``, ``rel_y``,
``rel_z`` (patch position relative to its bone, mm) and the parameter columns ``BV/TV``, ``Tb.Th``,
``Tb.Sp``, ``Tb.N``. **Labels** have one row per knee: ``subject``, ``oa`` (0/1) and optionally
``severity`` (and ``kl_grade``, unused here). A patch is valid when its ROI is known and all four
parameters and its position are finite.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import PARAMETERS, ROIS
from ..errors import UserError
from ..io.tables import numbers, yes_no_numbers
from ..io.tables import read_table as read_csv_table

ROI_ORDER = tuple(ROIS)                      # MFC, LFC, MTP, LTP -> token ROI index 0..3
POSITION_COLUMNS = ("rel_x", "rel_y", "rel_z")
PATCH_COLUMNS = ("subject", "roi", *POSITION_COLUMNS, *PARAMETERS)
ROI_MEAN_FEATURES = tuple(f"{roi}_{p}" for roi in ROI_ORDER for p in PARAMETERS)


class NoValidPatchesError(UserError):
    """One or more knees have no usable patch, so no probability can be given for them."""


def read_table(source, what: str, *, subjects: bool = False) -> pd.DataFrame:
    """A DataFrame as is (a copy), or a CSV file read by :func:`ctsma.io.tables.read_table`: every cell as text,
    as written (subject "0001" stays "0001", "NA" is a name); the columns used are converted where they are used.
    ``subjects``: refuse empty and repeated subject names (labels: one row per knee)."""
    if isinstance(source, pd.DataFrame):
        return source.copy()
    return read_csv_table(source, what, subjects=subjects)


def use_parameter_columns(table, prefix: str, what: str = "patch table") -> pd.DataFrame:
    """Copy of ``table`` whose ``<prefix><param>`` columns become the parameter columns.

    The patch store's ``patches.csv`` (``ctsma dataset build``) holds ``mr_<param>`` (MR reference) and
    ``true_<param>`` (phantom truth) side by side; ``prefix="mr_"`` or ``"true_"`` selects one of them.
    """
    df = read_table(table, what)
    if not prefix:
        return df
    missing = [f"{prefix}{p}" for p in PARAMETERS if f"{prefix}{p}" not in df.columns]
    if missing:
        have = parameter_prefixes(df)
        raise UserError(f"{what} lacks the column(s) {', '.join(missing)} named by the prefix {prefix!r}"
                        + (f" (its prefixes: {', '.join(have)})" if have else ""))
    df = df.drop(columns=[p for p in PARAMETERS if p in df.columns])
    return df.rename(columns={f"{prefix}{p}": p for p in PARAMETERS})


def parameter_prefixes(df: pd.DataFrame) -> list[str]:
    """The prefixes under which ``df`` holds all four parameter columns, in column order: ``mr_`` and ``true_`` in a
    patch store's ``patches.csv``; ``mr_``, ``teacher_``, ``student_distilled_``, ``student_baseline_`` and
    ``ct_direct_`` in ``ctsma evaluate``'s ``regression_predictions.csv``."""
    out: list[str] = []
    for c in map(str, df.columns):
        if c.endswith(PARAMETERS[0]) and len(c) > len(PARAMETERS[0]):
            pre = c[:-len(PARAMETERS[0])]
            if all(f"{pre}{p}" in df.columns for p in PARAMETERS) and pre not in out:
                out.append(pre)
    return out


def check_patch_table(table, what: str = "patch table") -> pd.DataFrame:
    """Validate the columns and types; returns a clean copy with ``subject`` as str and a ``valid`` flag."""
    df = read_table(table, what)
    missing = [c for c in PATCH_COLUMNS if c not in df.columns]
    if missing:
        hint = ""
        have = parameter_prefixes(df)
        if any(p in missing for p in PARAMETERS) and have:
            # name the table's own prefixes: 'mr_ or true_' sent a user of regression_predictions.csv, which holds
            # the students' values, to train on the MR reference instead
            pick = next((h for h in have if h.startswith('student')), have[0])
            hint = (f" (its parameter columns carry the prefix(es) {', '.join(have)}: choose one with --prefix, e.g. "
                    f"--prefix {pick}, or in 'diagnose evaluate' --prefix SOURCE={pick})")
        raise UserError(f"{what} lacks the column(s) {', '.join(missing)}; it needs {', '.join(PATCH_COLUMNS)}{hint}")
    df["subject"] = df["subject"].astype(str)
    df["roi"] = df["roi"].astype(str).str.strip()
    for c in (*POSITION_COLUMNS, *PARAMETERS):  # an empty cell, NaN or inf: an invalid patch; text: refused
        df[c] = numbers(df, c, what)
    df["valid"] = df["roi"].isin(ROI_ORDER) & np.all(np.isfinite(df[list(PARAMETERS) + list(POSITION_COLUMNS)]),
                                                       axis=1)
    return df


def check_labels(labels, what: str = "labels") -> pd.DataFrame:
    """One row per subject with ``oa`` in {0, 1}; ``severity`` kept when present (NaN otherwise)."""
    df = read_table(labels, what, subjects=True)
    for c in ("subject", "oa"):
        if c not in df.columns:
            raise UserError(f"{what} lacks the column '{c}'; it needs subject, oa (0/1) and optionally severity "
                            f"(has: {', '.join(map(str, df.columns))})")
    df = df.copy()
    df["subject"] = df["subject"].astype(str)
    if df["subject"].duplicated().any():
        dup = df.loc[df["subject"].duplicated(), "subject"].iloc[0]
        raise UserError(f"{what} lists subject {dup!r} more than once")
    oa = yes_no_numbers(df["oa"])
    if not oa.isin((0, 1)).all():
        bad = df.loc[~oa.isin((0, 1))].iloc[0]
        cell = "" if pd.isna(bad["oa"]) else str(bad["oa"]).strip()
        raise UserError(f"{what}: 'oa' must be 0 or 1 (or true/false, yes/no) for every subject (subject "
                        f"{bad['subject']!r} has "
                        f"{repr(cell) if cell else 'none'})")
    df["oa"] = oa.astype(int)
    df["severity"] = numbers(df, "severity", what) if "severity" in df.columns else np.nan
    return df[["subject", "oa", "severity"]].set_index("subject")


@dataclass
class KneeSet:
    """Patches grouped per knee, in a fixed subject order, with labels where known."""

    subjects: list[str]
    params: list[np.ndarray]      # per knee (n_i, 4) raw parameter values
    roi_index: list[np.ndarray]   # per knee (n_i,) ROI index 0..3
    positions: list[np.ndarray]   # per knee (n_i, 3) mm
    roi_means: np.ndarray         # (N, 16) raw ROI means (NaN where a ROI has no patch)
    oa: np.ndarray | None = None          # (N,) 0/1
    severity: np.ndarray | None = None    # (N,) float, NaN where unknown

    def __len__(self) -> int:
        return len(self.subjects)

    def subset(self, idx) -> "KneeSet":
        idx = np.asarray(idx, dtype=int)
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        return KneeSet(pick(self.subjects), pick(self.params), pick(self.roi_index), pick(self.positions),
                       self.roi_means[idx], None if self.oa is None else self.oa[idx],
                       None if self.severity is None else self.severity[idx])


def knees_without_patches(patches: pd.DataFrame, subjects) -> list[str]:
    have = set(patches.loc[patches["valid"], "subject"])
    return [s for s in subjects if s not in have]


def rois_without_patches(patches: pd.DataFrame, subjects) -> dict[str, list[str]]:
    """The ROIs (in ROI order) without a valid patch of each of ``subjects`` that has some valid patch; knees with
    all four ROIs are left out."""
    have = patches.loc[patches["valid"]].groupby("subject")["roi"].agg(set).to_dict()
    out = {s: [r for r in ROI_ORDER if r not in have[s]] for s in subjects if s in have}
    return {s: rois for s, rois in out.items() if rois}


NO_VALID_PATCH = "no valid patch (ROI MFC/LFC/MTP/LTP with finite parameters): no diagnosis"


def incomplete_knee_message(missing) -> str:
    """Why a knee without a valid patch in the ROIs ``missing`` gets no OA probability, naming them."""
    return (f"ROI(s) {', '.join(missing)} have no valid patch, and the diagnosis model reads all four "
            f"({'/'.join(ROI_ORDER)}; it learnt from knees with patches in each): no diagnosis; check the ROIs")


def labels_in_every_table(labels: pd.DataFrame, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The rows of ``labels`` (a table with a ``subject`` column) of the knees that have rows in every patch table of
    ``tables`` (source name -> checked table). A cohort's labels sheet lists every knee, and a knee the dataset left
    out (by its registration QA) or kept for testing is in no table; one missing from some tables only would make
    the sources' cross-validations unpaired. The knees left out are named in one warning; when no labelled knee is
    in the tables, the labels are returned as they are (the caller's error then names them)."""
    if "subject" not in labels.columns or not tables:
        return labels
    subject = labels["subject"].astype(str)
    common = set.intersection(*(set(t["subject"].astype(str)) for t in tables.values()))
    absent = sorted(set(subject) - common)
    if absent and len(absent) < len(set(subject)):
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        where = ("the patch table" if len(tables) == 1 else
                 "some of the patch tables; left out of every source, so that all are scored on the same knees")
        warnings.warn(f"{len(absent)} of {len(set(subject))} labelled knee(s) have no row in {where} ({shown}): "
                      "left out (knees the dataset excluded, or kept for testing, are not in it)", stacklevel=3)
        return labels[subject.isin(common).to_numpy()]
    return labels


def build_kneeset(patch_table, labels=None) -> KneeSet:
    """Group valid patches per knee. With ``labels``, the knees are the labelled ones (patches of
    unlabelled subjects are not used).

    A labelled knee whose patch rows are all invalid raises :class:`NoValidPatchesError` naming it (training
    and evaluation must not silently drop patients); a labelled knee without any row in the table (one the
    dataset left out, e.g. by its registration QA, or kept for testing: a cohort's labels sheet lists every knee) is
    left out with a warning naming it. Without labels, knees without valid patches are left out; call
    :func:`knees_without_patches` to report them.
    """
    patches = check_patch_table(patch_table)
    if labels is not None:
        lab = check_labels(labels_in_every_table(read_table(labels, "labels", subjects=True), {"": patches}))
        subjects = sorted(lab.index)
        empty = knees_without_patches(patches, subjects)
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise NoValidPatchesError(
                f"{len(empty)} labelled knee(s) have no valid patch (ROI in {'/'.join(ROI_ORDER)} with finite "
                f"parameters and position): {shown}; fix their patch rows or remove them from the labels")
    else:
        lab = None
        subjects = sorted(set(patches.loc[patches["valid"], "subject"]))
        if not subjects:
            raise NoValidPatchesError("the patch table has no valid patch at all")
    valid = patches[patches["valid"]]
    groups = dict(tuple(valid.groupby("subject", sort=False)))
    roi_code = {r: i for i, r in enumerate(ROI_ORDER)}
    params, rois, pos = [], [], []
    means = np.full((len(subjects), len(ROI_MEAN_FEATURES)), np.nan)
    for k, s in enumerate(subjects):
        g = groups[s]
        p = g[list(PARAMETERS)].to_numpy(float)
        r = g["roi"].map(roi_code).to_numpy(int)
        params.append(p)
        rois.append(r)
        pos.append(g[list(POSITION_COLUMNS)].to_numpy(float))
        for j in range(len(ROI_ORDER)):
            if np.any(r == j):
                means[k, j * len(PARAMETERS):(j + 1) * len(PARAMETERS)] = p[r == j].mean(axis=0)
    oa = sev = None
    if lab is not None:
        oa = lab.loc[subjects, "oa"].to_numpy(int)
        sev = lab.loc[subjects, "severity"].to_numpy(float)
    return KneeSet(subjects, params, rois, pos, means, oa, sev)


def warn_incomplete_knees(knees: KneeSet, what: str = "") -> list[str]:
    """Warn, naming them, about the labelled knees without a valid patch in some ROI: cross-validation and training
    use them (the ROI-mean models with the training mean in place of the missing ROI), while :func:`predict` gives
    such a knee no probability, so a cohort of them gets a cross-validated AUC that no prediction would match.
    Returns the knees."""
    gaps = {s: [r for j, r in enumerate(ROI_ORDER) if not np.any(idx == j)]
            for s, idx in zip(knees.subjects, knees.roi_index)}
    gaps = {s: rois for s, rois in gaps.items() if rois}
    if gaps:
        shown = "; ".join(f"{s}: {', '.join(r)}" for s, r in list(gaps.items())[:5]) + (" …" if len(gaps) > 5 else "")
        warnings.warn(f"{what + ': ' if what else ''}{len(gaps)} of {len(knees)} labelled knee(s) have no valid "
                      f"patch in some ROI ({shown}); cross-validation and training use them (the logistic and MLP "
                      "models with the training knees' mean in place of the missing ROI), but `predict` gives such a "
                      "knee no probability: check the ROIs",
                      stacklevel=3)
    return list(gaps)


REFERENCE_DESCRIPTION = ("non-OA knees (oa = 0) of the diagnosis model's training cohort: mean and SD (ddof 1) "
                         "across knees of each knee's ROI mean")


def reference_ranges(knees: KneeSet) -> list[dict]:
    """The non-OA reference range of each ROI mean: ``{roi, parameter, mean, sd, n_knees}`` records over the
    labelled knees without OA (:data:`REFERENCE_DESCRIPTION`); an ROI and parameter with fewer than two such
    knees has no range and no record."""
    if knees.oa is None:
        raise UserError("reference ranges need OA labels")
    healthy = knees.roi_means[np.asarray(knees.oa) == 0]
    out = []
    for j in range(len(ROI_MEAN_FEATURES)):
        v = healthy[:, j][np.isfinite(healthy[:, j])]
        if len(v) >= 2:
            roi, param = ROI_ORDER[j // len(PARAMETERS)], PARAMETERS[j % len(PARAMETERS)]
            out.append({"roi": roi, "parameter": param, "mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                        "n_knees": int(len(v))})
    return out


@dataclass
class Normaliser:
    """Standardisation statistics fitted on TRAINING knees only (stored in the model file)."""

    param_mean: np.ndarray
    param_std: np.ndarray
    pos_scale: float
    means_mean: np.ndarray
    means_std: np.ndarray
    sev_mean: float
    sev_std: float

    @classmethod
    def fit(cls, knees: KneeSet) -> "Normaliser":
        allp = np.concatenate(knees.params)
        allpos = np.concatenate(knees.positions)
        with warnings.catch_warnings():  # an ROI without a patch in any knee (warn_incomplete_knees said so)
            warnings.simplefilter("ignore", RuntimeWarning)
            mm = np.nanmean(knees.roi_means, axis=0)
            ms = np.nanstd(knees.roi_means, axis=0)
        mm = np.where(np.isfinite(mm), mm, 0.0)
        ms = np.where(np.isfinite(ms) & (ms > 0), ms, 1.0)
        ps = allp.std(axis=0)
        sev = knees.severity[np.isfinite(knees.severity)] if knees.severity is not None else np.empty(0)
        return cls(allp.mean(axis=0), np.where(ps > 0, ps, 1.0), float(allpos.std()) if allpos.std() > 0 else 1.0,
                   mm, ms, float(sev.mean()) if sev.size else 0.0,
                   float(sev.std()) if sev.size > 1 and sev.std() > 0 else 1.0)

    def patches(self, knees: KneeSet) -> list[np.ndarray]:
        """Per knee (n_i, 7): standardised parameters then scaled positions."""
        return [np.hstack([(p - self.param_mean) / self.param_std, x / self.pos_scale]).astype(np.float32)
                for p, x in zip(knees.params, knees.positions)]

    def tokens(self, knees: KneeSet) -> list[np.ndarray]:
        """Per knee (n_i + s_i, 8): the patch tokens (flag 0) then one summary token per ROI present
        (flag 1: the ROI's mean standardised parameters at the ROI's mean position), in ROI order
        ``np.unique(roi_index)``."""
        out = []
        for z, r in zip(self.patches(knees), knees.roi_index):
            summ = np.stack([z[r == j].mean(axis=0) for j in np.unique(r)])
            out.append(np.vstack([np.hstack([z, np.zeros((len(z), 1), np.float32)]),
                                  np.hstack([summ, np.ones((len(summ), 1), np.float32)])]).astype(np.float32))
        return out

    def roi_means(self, knees: KneeSet) -> np.ndarray:
        """(N, 16) standardised ROI means; a ROI with no patch gets the training mean (0)."""
        z = (knees.roi_means - self.means_mean) / self.means_std
        return np.where(np.isfinite(z), z, 0.0).astype(np.float32)

    def to_tensors(self) -> dict:
        return {"norm.param_mean": self.param_mean, "norm.param_std": self.param_std,
                "norm.means_mean": self.means_mean, "norm.means_std": self.means_std,
                "norm.scalars": np.array([self.pos_scale, self.sev_mean, self.sev_std])}

    @classmethod
    def from_tensors(cls, t: dict) -> "Normaliser":
        g = lambda k: np.asarray(t[k], dtype=float)  # noqa: E731
        sc = g("norm.scalars")
        return cls(g("norm.param_mean"), g("norm.param_std"), float(sc[0]), g("norm.means_mean"),
                   g("norm.means_std"), float(sc[1]), float(sc[2]))
