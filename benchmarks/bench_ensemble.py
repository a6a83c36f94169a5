"""Seed ensembles of the cross-fitted CNNs: do averaged predictions agree better with the MR reference?

    .venv/bin/python benchmarks/bench_ensemble.py RUN RUN [RUN ...] [--seed S] [--tag NAME]

Each RUN is a finished demo output folder or a ``bench_crossfit.py`` work folder: the same patch store and the same
cross-fitting folds (the demo's ``--seed``), trained with different training seeds (``bench_crossfit.py --store
<demo>/dataset/store --seed S --train-seed N``). A run's evaluation holds the out-of-fold predictions of its
teacher, distilled student and baseline (``evaluation/regression_predictions.csv``, rows ``oof_index.npy``); the
runs must agree on those rows, their subjects and their MR references, or the script stops.

For each model (teacher, distilled, baseline) it reports, for every run alone and for the ensemble (the mean of the
runs' predictions, patch by patch): ICC(2,1) against the MR reference per parameter and their mean, the
distillation gain with its patient-bootstrap CI (the demo's ``distillation_gain``), and the same ICCs for ROI
means (each knee-ROI's mean over its patches, as ``bench_roi_agreement.py``'s out-of-fold row, which agrees with the
maps' ROI means to about 0.001). Writes ``benchmarks/results/bench_ensemble[_<tag>].json``.

What it measures: how much of a model's disagreement with the reference is training noise (initialisation,
batch order, augmentation), which averaging removes, rather than what the input does not record, which it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ctsma import PARAMETERS
from ctsma.dataset.store import PatchStore
from ctsma.evaluation.regression import agreement_block, distillation_gain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_roi_agreement import icc_table, mr_roi_means  # noqa: E402

MODELS = ("teacher", "student_distilled", "student_baseline")
ROOT = Path(__file__).resolve().parents[1]


def load_run(run: Path) -> tuple[np.ndarray, pd.DataFrame]:
    ev = run / "evaluation"
    if not (ev / "regression_predictions.csv").is_file() or not (ev / "oof_index.npy").is_file():
        raise SystemExit(f"{run} has no finished evaluation (evaluation/regression_predictions.csv, oof_index.npy)")
    return np.load(ev / "oof_index.npy"), pd.read_csv(ev / "regression_predictions.csv", dtype={"subject": str})


def preds_of(table: pd.DataFrame, model: str) -> np.ndarray:
    return table[[f"{model}_{p}" for p in PARAMETERS]].to_numpy(float)


def summary(ref, pred, subjects, base: pd.DataFrame, mr_roi: pd.DataFrame) -> dict:
    block = agreement_block(ref, pred, subjects)
    roi = pd.concat([base.assign(parameter=p, value=pred[:, j]) for j, p in enumerate(PARAMETERS)])
    roi = roi.groupby(["subject", "roi", "parameter"], as_index=False).value.mean()
    rt = icc_table(roi, mr_roi)
    return {"patch_icc21": {p: round(float(block[p]["icc21"]), 4) for p in PARAMETERS},
            "patch_mean_icc21": round(float(block["mean_icc21"]), 4),
            "roi_icc21": {p: rt[p]["icc21"] for p in PARAMETERS}, "roi_mean_icc21": rt["mean_icc21"]}


def gain(ref, distilled, baseline, subjects, n_boot, seed) -> dict:
    g = distillation_gain(ref, distilled, baseline, subjects, n_boot=n_boot, seed=seed)
    return {"mean_icc21_diff": round(float(g["mean_icc21_diff"]), 4), "ci": [round(float(c), 4) for c in g["ci"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="demo output or bench_crossfit work folders (same store and folds)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed of the gain (the demo uses its cohort seed)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--tag", default="")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if len(a.runs) < 2:
        raise SystemExit("give at least two runs to average")
    runs = [Path(r).resolve() for r in a.runs]
    loaded = [load_run(r) for r in runs]
    idx, first = loaded[0]
    for r, (i, t) in zip(runs[1:], loaded[1:]):
        same = (np.array_equal(i, idx) and t["subject"].equals(first["subject"])
                and np.array_equal(t[[f"mr_{p}" for p in PARAMETERS]].to_numpy(float),
                                   first[[f"mr_{p}" for p in PARAMETERS]].to_numpy(float), equal_nan=True))
        if not same:
            raise SystemExit(f"{r} has other out-of-fold rows or references than {runs[0]}: not the same store "
                             "and folds")
    store = PatchStore(runs[0] / "dataset" / "store")
    table = store.table.copy()
    table["subject"] = table["subject"].astype(str)
    base = table.iloc[idx][["subject", "roi"]].reset_index(drop=True)
    mr_roi = mr_roi_means(table)
    ref = first[[f"mr_{p}" for p in PARAMETERS]].to_numpy(float)
    subjects = first["subject"].to_numpy()

    res = {"runs": [str(r) for r in runs], "n_patches": int(len(idx)), "n_patients": int(len(set(subjects))),
           "members": [], "ensemble": {}}
    for r, (_, t) in zip(runs, loaded):
        m = {"run": str(r)}
        for model in MODELS:
            m[model] = summary(ref, preds_of(t, model), subjects, base, mr_roi)
        m["distillation_gain"] = gain(ref, preds_of(t, "student_distilled"), preds_of(t, "student_baseline"),
                                      subjects, a.n_boot, a.seed)
        res["members"].append(m)
    mean_preds = {model: np.mean([preds_of(t, model) for _, t in loaded], axis=0) for model in MODELS}
    for model in MODELS:
        res["ensemble"][model] = summary(ref, mean_preds[model], subjects, base, mr_roi)
    res["ensemble"]["distillation_gain"] = gain(ref, mean_preds["student_distilled"], mean_preds["student_baseline"],
                                                subjects, a.n_boot, a.seed)

    print(f"{len(runs)} runs, {res['n_patches']} out-of-fold patches of {res['n_patients']} patients")
    print(f"{'':28}" + "".join(f"{p:>8}" for p in PARAMETERS) + f"{'mean':>8}{'ROI mean':>10}")
    for model in MODELS:
        rows = [(f"run {k + 1}", m[model]) for k, m in enumerate(res["members"])] + [("ensemble", res["ensemble"][model])]
        for name, s in rows:
            print(f"{model + ' ' + name:<28}" + "".join(f"{s['patch_icc21'][p]:8.3f}" for p in PARAMETERS)
                  + f"{s['patch_mean_icc21']:8.3f}{s['roi_mean_icc21']:10.3f}")
    for name, g in [(f"run {k + 1}", m["distillation_gain"]) for k, m in enumerate(res["members"])] + [
            ("ensemble", res["ensemble"]["distillation_gain"])]:
        print(f"distillation gain {name}: {g['mean_icc21_diff']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]")
    out = Path(a.results) / f"bench_ensemble{'_' + a.tag if a.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
