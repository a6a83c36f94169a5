"""Does the CT around a patch say more about its MR reference than the student already does?  (demo run)

The students read an 8-mm CT cube. A larger field of view would let a student see the bone around the patch,
which varies smoothly (the phantom's thickness fields have wavelengths of 12-30 mm). Before building a
student with context, this benchmark asks whether the context carries information at all: for every patch of a
finished demo run, the CT's mean HU inside the patch's ROI and inside its bone, and the bone's HU SD, in cubes
of 8, 16 and 24 mm about the patch centre, and the mean HU of the whole ROI, are stacked with a model's
out-of-fold prediction in a ridge regression per parameter, fitted on the other patient folds of the store
(``fold`` column) and applied to the held-out fold. The figure is ICC(2,1) against the MR reference of the
stacked prediction with the features against the stacked prediction without them (a linear calibration alone
changes the ICC, so that is the comparison, not the raw prediction's ICC: "neighbours within 0 mm" below).
The ROIs are the phantom's CT ROI labels (the store's automatic ROIs are not kept).

A second figure asks the same of the model's own predictions around the patch: each patch's prediction is
replaced by the mean of the predictions of its ROI's patches whose centres lie within R mm (R = 0 is the
prediction itself; 100 mm is the ROI's mean), and ICC(2,1) against the MR reference is reported per R.

    .venv/bin/python benchmarks/bench_ct_context.py --demo DEMO_OUT [--tag NAME]

Writes ``benchmarks/results/bench_ct_context[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctsma import PARAMETERS  # noqa: E402
from ctsma.stats.agreement import icc_value  # noqa: E402

HALF_MM = (4, 8, 12)  # cubes of 8, 16 and 24 mm
FEATURE_SETS = {
    "patch HU": ["roi4", "bone4", "bsd4"],
    "16 mm cube": ["roi4", "bone4", "bsd4", "roi8", "bone8", "bsd8"],
    "24 mm cube": ["roi4", "bone4", "bsd4", "roi8", "bone8", "bsd8", "roi12", "bone12", "bsd12"],
    "ROI mean HU": ["roiall"],
}
SOURCES = ("student_distilled", "student_baseline", "teacher")
RADII_MM = (0.0, 4.5, 6.5, 9.0, 13.0, 100.0)  # neighbours 4 mm apart: the next one, diagonals, ...


def _cube_stats(ct, rois, bones, idx, spacing, roi_label, bone_label, out):
    for half in HALF_MM:
        lo = np.maximum(np.round(idx - half / spacing).astype(int), 0)
        hi = np.round(idx + half / spacing).astype(int) + 1
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        in_roi, in_bone = rois[box] == roi_label, bones[box] == bone_label
        out[f"roi{half}"] = ct[box][in_roi].mean() if in_roi.any() else np.nan
        out[f"bone{half}"] = ct[box][in_bone].mean() if in_bone.any() else np.nan
        out[f"bsd{half}"] = ct[box][in_bone].std() if in_bone.any() else np.nan


def context_features(demo: Path, patches: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for subject, group in patches.groupby("subject"):
        folder = demo / "phantom" / subject
        labels = json.loads((folder / "metadata.json").read_text())["labels"]
        image = sitk.ReadImage(str(folder / "ct.nii.gz"))
        ct = sitk.GetArrayFromImage(image).astype(np.float32)
        rois = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_rois.nii.gz")))
        bones = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ct_bones.nii.gz")))
        spacing = np.array(image.GetSpacing())[::-1]
        roi_labels = labels["rois"]
        roi_mean = {name: float(ct[rois == value].mean()) for name, value in roi_labels.items()}
        for r in group.itertuples():
            point = (r.centre_x, r.centre_y, r.centre_z)
            idx = np.array(image.TransformPhysicalPointToContinuousIndex(point))[::-1]
            bone = labels["bones_image"]["femur" if r.roi in ("MFC", "LFC") else "tibia"]
            row = {"index": r.index, "subject": subject, "roiall": roi_mean[r.roi]}
            _cube_stats(ct, rois, bones, idx, spacing, roi_labels[r.roi], bone, row)
            rows.append(row)
    return pd.DataFrame(rows)


def stacked(table: pd.DataFrame, y: np.ndarray, columns: list[str], ridge: float = 1.0) -> np.ndarray:
    """Out-of-fold ridge predictions of ``y`` from ``columns`` (standardised on the training folds)."""
    m = np.column_stack([table[c].to_numpy(float) for c in columns])
    pred = np.empty(len(y))
    for fold in sorted(table["fold"].unique()):
        train, test = table["fold"].to_numpy() != fold, table["fold"].to_numpy() == fold
        mu, sd = m[train].mean(0), m[train].std(0)
        sd[sd == 0] = 1.0
        z = np.column_stack([(m - mu) / sd, np.ones(len(m))])
        a = z[train].T @ z[train] + ridge * np.diag([1.0] * m.shape[1] + [0.0])
        pred[test] = z[test] @ np.linalg.solve(a, z[train].T @ y[train])
    return pred


def neighbour_means(table: pd.DataFrame, values: np.ndarray, radius: float) -> np.ndarray:
    """Each patch's value replaced by the mean over its ROI's patches with centres within ``radius`` mm."""
    out = np.empty_like(values)
    xyz = table[["centre_x", "centre_y", "centre_z"]].to_numpy(float)
    for rows in table.groupby(["subject", "roi"]).indices.values():
        d = np.linalg.norm(xyz[rows, None] - xyz[None, rows], axis=2)
        w = (d <= radius + 1e-6).astype(float)
        out[rows] = w @ values[rows] / w.sum(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", required=True, help="a finished `ctsma demo` output folder")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    demo = Path(a.demo)
    patches = pd.read_csv(demo / "dataset" / "store" / "patches.csv")
    predictions = pd.read_csv(demo / "evaluation" / "regression_predictions.csv")
    if "index" not in predictions:  # older runs kept the patch order beside the table, and no ROI column
        predictions.insert(0, "index", np.load(demo / "evaluation" / "oof_index.npy"))
    predictions = predictions.drop(columns=["roi"], errors="ignore")
    features = context_features(demo, patches)
    table = predictions.merge(features, on=["index", "subject"]).merge(
        patches[["index", "roi", "fold", "centre_x", "centre_y", "centre_z"]], on="index")
    table = table.fillna(table.mean(numeric_only=True))  # a cube without ROI or bone voxels: the cohort's mean
    result = {"demo": str(demo.resolve()), "n_patches": int(len(table)),
              "n_subjects": int(table["subject"].nunique()), "folds": int(table["fold"].nunique()), "sources": {}}
    for source in SOURCES:
        rows = {}
        for name, extra in {"prediction alone": [], **FEATURE_SETS}.items():
            iccs = {}
            for p in PARAMETERS:
                y = table[f"mr_{p}"].to_numpy(float)
                iccs[p] = icc_value(y, stacked(table, y, [f"{source}_{p}", *extra]))
            rows[name] = {"mean": float(np.mean(list(iccs.values()))), **iccs}
        for radius in RADII_MM:
            iccs = {p: icc_value(table[f"mr_{p}"].to_numpy(float),
                                 neighbour_means(table, table[f"{source}_{p}"].to_numpy(float), radius))
                    for p in PARAMETERS}
            rows[f"neighbours within {radius:g} mm"] = {"mean": float(np.mean(list(iccs.values()))), **iccs}
        result["sources"][source] = rows
        print(source)
        for name, r in rows.items():
            print(f"  {name:26s} {r['mean']:.4f}  " + " ".join(f"{r[p]:.3f}" for p in PARAMETERS))
    out = ROOT / "benchmarks" / "results" / f"bench_ct_context{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
