"""How much of the CT students' error is the knee's own tissue HU?  (issues 7 and 8)

A phantom knee draws its CT tissue values once: bone tissue ~N(1750, 60) HU and marrow ~U(-90, 10) HU
(``ctsma.phantom.subject``), as real knees differ in mineralisation and marrow fat. A CT patch of 8 mm shows
blurred trabeculae whose HU mixes the two, so a student that sees one patch cannot tell a denser structure from
denser bone tissue or leaner marrow. The MR reference does not depend on these values (bone has no BFFE signal and
the marrow level is read from each patch). This benchmark measures how much of the students' error that explains
and how much a CT-only, knee-level statistic could give back.

For every knee of a finished demo run it takes the out-of-fold patch predictions of the students
(``evaluation/regression_predictions.csv``, rows in the order of ``evaluation/oof_index.npy``) and

* the knee's true tissue values, regenerated from the phantom's seed and index (ground truth: the *oracle* rows,
  for analysis only, since no CT-only tool knows them);
* CT-only statistics of the knee: HU percentiles inside the femur and tibia of the **automatic** bone
  segmentation, 4 voxels in from the surface (``in1``, ``in50``: the trabecular interior, whose values also
  follow the knee's bone volume fraction), and over the whole femur and tibia (``all99.9``: the cortical peak,
  which follows the bone tissue's HU).

Each feature set gives a linear correction of the predictions, ``pred + X b`` per parameter, with ``b`` fitted
on the knees of the other cross-fitting folds (the demo's folds), so every corrected value is still out of
fold. ICC(2,1) against the MR reference before and after, for patches and for ROI means (issue 8's level: the
mean over a knee's patches in an ROI). The correction is a probe of the size of the effect, not a method (the
fitted residuals come from models that saw the other folds' knees).

    .venv/bin/python benchmarks/bench_knee_calibration.py DEMO_DIR [--tag NAME]

Writes ``benchmarks/results/bench_knee_calibration[_NAME].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctsma.stats.agreement import icc_value  # noqa: E402

PARAMS = ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")
SOURCES = ("student_distilled", "student_baseline")
CORTEX_COLS = ["femur_tissue_hu", "tibia_tissue_hu", "femur_width_mm", "tibia_width_mm"]
FEATURE_SETS = {
    "oracle: bone and marrow HU": ["true_bone_hu", "true_marrow_hu"],
    "oracle: bone HU": ["true_bone_hu"],
    "oracle: marrow HU": ["true_marrow_hu"],
    "CT: cortical peak (all99.9)": ["all99.9"],
    "CT: in1, in50, all99.9": ["in1", "in50", "all99.9"],
    "CT: cortical fit": CORTEX_COLS,
    "CT: cortical fit, in1, in50": CORTEX_COLS + ["in1", "in50"],
}
INNER_VOXELS = 4


def knee_features(run: Path) -> pd.DataFrame:
    import SimpleITK as sitk
    from scipy import ndimage

    from ctsma.inference.cortex import cortical_shell
    from ctsma.phantom.settings import from_dict
    from ctsma.phantom.subject import sample_subject
    from ctsma.segmentation.bones import segment_bones

    rows = []
    manifest = pd.read_csv(run / "phantom" / "manifest.csv", dtype={"subject": str})
    for i, subject in enumerate(manifest["subject"]):
        meta = json.loads((run / "phantom" / subject / "metadata.json").read_text())
        truth = sample_subject(from_dict(meta["settings"]), meta["seed"], meta["index"])
        materials, cortex = truth["materials"]["ct"], truth["anatomy"]["cortex"]
        img = sitk.ReadImage(str(run / "phantom" / subject / "ct.nii.gz"))
        ct = sitk.GetArrayViewFromImage(img).astype(np.float32)
        labels_img = segment_bones(img, side=manifest["side"].iloc[i])
        labels = sitk.GetArrayFromImage(labels_img)
        bone = (labels == 1) | (labels == 2)
        inner = ndimage.binary_erosion(bone, iterations=INNER_VOXELS)
        row = {"subject": subject, "true_bone_hu": materials["bone"], "true_marrow_hu": materials["marrow"],
               "true_femur_cortex_mm": float(cortex[0]), "true_tibia_cortex_mm": float(cortex[1])}
        for q in (1, 50):
            row[f"in{q}"] = float(np.percentile(ct[inner], q))
        row["all99.9"] = float(np.percentile(ct[bone], 99.9))
        shell = cortical_shell(img, labels_img, {"femur": 1, "tibia": 2})
        for b in ("femur", "tibia"):
            row[f"{b}_tissue_hu"], row[f"{b}_width_mm"] = shell[b]["tissue_hu"], shell[b]["width_mm"]
        rows.append(row)
        print(f"  {subject}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "subject"), flush=True)
    return pd.DataFrame(rows).set_index("subject")


def truth_recovery(feats: pd.DataFrame) -> dict:
    """How well the CT-only features give the true tissue values: Pearson r of each fitted cortical value with its
    truth, and the leave-one-knee-out r of a linear prediction of the true bone HU from each CT feature set."""
    def loo_r(cols, target):
        x = np.c_[np.ones(len(feats)), feats[cols].to_numpy(float)]
        y = feats[target].to_numpy(float)
        pred = np.empty(len(y))
        for i in range(len(y)):
            m = np.arange(len(y)) != i
            b, *_ = np.linalg.lstsq(x[m], y[m], rcond=None)
            pred[i] = x[i] @ b
        return float(np.corrcoef(pred, y)[0, 1])

    def r(a, b):
        return float(np.corrcoef(feats[a], feats[b])[0, 1])

    out = {"r": {f"{b}_tissue_hu vs true_bone_hu": r(f"{b}_tissue_hu", "true_bone_hu") for b in ("femur", "tibia")}
           | {f"{b}_width_mm vs true_{b}_cortex_mm": r(f"{b}_width_mm", f"true_{b}_cortex_mm")
              for b in ("femur", "tibia")}
           | {"all99.9 vs true_bone_hu": r("all99.9", "true_bone_hu")},
           "loo_r_true_bone_hu": {name: loo_r(cols, "true_bone_hu") for name, cols in FEATURE_SETS.items()
                                  if name.startswith("CT")},
           "loo_r_true_marrow_hu": {name: loo_r(cols, "true_marrow_hu") for name, cols in FEATURE_SETS.items()
                                    if name.startswith("CT")}}
    for k, v in out.items():
        print(f"{k}: " + ", ".join(f"{n} {x:.2f}" for n, x in v.items()))
    return out


def folds_of(run: Path, k: int, seed: int):
    from ctsma.dataset.store import PatchStore

    store = PatchStore(run / "dataset" / "store")
    out = {}
    for fold in range(k):
        split = store.patient_split(0.25, 0.2, k=k, fold=fold, seed=seed, use_stored=False)
        out.update({s: fold for s in split.subjects["test"]})
    return out, store


def corrected(pred: pd.DataFrame, feats: pd.DataFrame, cols: list[str], src: str, par: str) -> np.ndarray:
    x = feats.loc[pred["subject"], cols].to_numpy(float)
    x = np.c_[np.ones(len(x)), (x - x.mean(0)) / x.std(0)]
    y, yh = pred[f"mr_{par}"].to_numpy(), pred[f"{src}_{par}"].to_numpy()
    out = yh.copy()
    fold = pred["fold"].to_numpy()
    for k in np.unique(fold):
        train = fold != k
        b, *_ = np.linalg.lstsq(x[train], (y - yh)[train], rcond=None)
        out[~train] = yh[~train] + x[~train] @ b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished demo run (ctsma demo --out DIR)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    meta = json.loads(next((a.run / "phantom").glob("*/metadata.json")).read_text())
    seed = int(meta["seed"])
    fold, store = folds_of(a.run, a.folds, seed)
    pred = pd.read_csv(a.run / "evaluation" / "regression_predictions.csv", dtype={"subject": str})
    idx = np.load(a.run / "evaluation" / "oof_index.npy")
    if not (store.table["subject"].to_numpy()[idx] == pred["subject"].to_numpy()).all():
        raise SystemExit("oof_index.npy does not match regression_predictions.csv")
    pred["roi"] = store.table["roi"].to_numpy()[idx]
    pred["fold"] = pred["subject"].map(fold)
    print(f"cohort seed {seed}: {len(pred)} patches of {pred['subject'].nunique()} knees")
    feats = knee_features(a.run)
    result = {"run": str(a.run), "cohort_seed": seed, "n_patches": len(pred), "n_knees": int(pred["subject"].nunique()),
              "residual_correlation": {}, "icc21": {}}
    for src in SOURCES:  # how the residuals follow the true tissue values
        result["residual_correlation"][src] = {
            par: {c: float(np.corrcoef(pred[f"{src}_{par}"] - pred[f"mr_{par}"],
                                       feats.loc[pred["subject"], c])[0, 1]) for c in ("true_bone_hu", "true_marrow_hu")}
            for par in PARAMS}
    result["truth_recovery"] = truth_recovery(feats)
    feats_rows = {"none": None, **FEATURE_SETS}
    print(f"{'features':32s} {'source':18s} {'patches: BV/TV Tb.Th Tb.Sp Tb.N mean':>40s}   ROI means: ... mean")
    for name, cols in feats_rows.items():
        result["icc21"][name] = {}
        for src in SOURCES:
            table = pred.copy()
            for par in PARAMS:
                if cols is not None:
                    table[f"{src}_{par}"] = corrected(pred, feats, cols, src, par)
            roi = table.groupby(["subject", "roi"]).mean(numeric_only=True)
            patch_icc = [icc_value(table[f"mr_{p}"], table[f"{src}_{p}"]) for p in PARAMS]
            roi_icc = [icc_value(roi[f"mr_{p}"], roi[f"{src}_{p}"]) for p in PARAMS]
            result["icc21"][name][src] = {"patches": dict(zip(PARAMS, patch_icc)), "patches_mean": float(np.mean(patch_icc)),
                                          "roi_means": dict(zip(PARAMS, roi_icc)), "roi_means_mean": float(np.mean(roi_icc))}
            print(f"{name:32s} {src:18s} " + " ".join(f"{v:.3f}" for v in patch_icc) + f" {np.mean(patch_icc):.3f}   "
                  + " ".join(f"{v:.3f}" for v in roi_icc) + f" {np.mean(roi_icc):.3f}")
    result["features"] = feats.reset_index().to_dict(orient="records")
    out = ROOT / "benchmarks" / "results" / f"bench_knee_calibration{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
