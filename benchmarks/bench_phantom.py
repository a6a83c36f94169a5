"""Phantom benchmark: speed and memory per knee, and realism checks on a cohort.

Usage::

    .venv/bin/python benchmarks/bench_phantom.py [--n 16] [--workers 2] [--cohort DIR]
                                                 [--auc-knees 0] [--skip-speed | --speed-only] [--json FILE]

1. Speed/memory: one knee at the demo and at the full preset, each in a fresh single-threaded
   process (wall and CPU seconds, peak resident memory). The first knee of a process includes
   loading the numba kernels; a second knee in the same process is timed too.
2. Realism on a demo cohort of ``--n`` knees (generated into ``--cohort`` unless already there):
   CT HU and MR intensity per tissue (eroded masks) against the documented ranges;
   morphometry measured directly on the CT (ICC(2,1) vs truth; target < 0.5 for Tb.Th and Tb.Sp)
   and on the MR (Spearman vs truth; target >= 0.8 for BV/TV and Tb.Th) in the four ROIs;
   landmark error through the stored transform (target < 1e-3 mm); the cross-validated AUC of a
   logistic regression on the true ROI parameters (target about 0.90-0.97), optionally on
   ``--auc-knees`` extra truth-only knees for a tighter estimate.
Prints a table and writes JSON (default benchmarks/results/phantom.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# CT: the synovial fluid film (<= 1 mm) is thinner than the CT voxels, so it has no eroded interior there.
HU_RANGES = {"air": (-1010, -950), "fat": (-130, -70), "muscle": (20, 70), "cartilage": (60, 150),
             "trabecular bone region": (100, 700), "cortical peak (99th pct in bone)": (900, 1900)}
MR_RANGES = {"fluid": (0.9, 1.25), "fat": (1.0, 1.0), "trabecular bone region": (0.45, 0.95),
             "cartilage": (0.3, 0.6), "muscle": (0.15, 0.4), "meniscus": (0.0, 0.2), "air": (0.0, 0.1)}
CODES = {"air": [0], "fat": [22], "muscle": [23], "cartilage": [10, 11, 12], "fluid": [20], "meniscus": [21]}

SPEED_CODE = r"""
import json, resource, sys, time, tempfile
sys.path.insert(0, {src!r})
from ctsma.phantom import make_settings, generate_knee
s = make_settings({preset!r})
out = tempfile.mkdtemp()
res = []
for i in range(2):
    t0, c0 = time.perf_counter(), time.process_time()
    generate_knee(s, 0, i, out)
    res.append((time.perf_counter() - t0, time.process_time() - c0))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({{"first_wall_s": res[0][0], "first_cpu_s": res[0][1], "wall_s": res[1][0], "cpu_s": res[1][1],
                  "peak_rss_mb": rss}}))
"""


def speed(preset: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    code = SPEED_CODE.format(src=str(ROOT / "src"), preset=preset)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load_average_1min"] = os.getloadavg()[0]
    return out


def tissue_stats(knee: Path) -> dict:
    import SimpleITK as sitk
    from scipy import ndimage

    def arr(name):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(knee / name))).astype(np.float64)
    ct, ctt = arr("ct.nii.gz"), arr("ct_tissues.nii.gz")
    mr, mrt = arr("mr.nii.gz"), arr("mr_tissues.nii.gz")
    out = {"ct": {}, "mr": {}}
    for img, lab, key in ((ct, ctt, "ct"), (mr, mrt, "mr")):
        for name, codes in CODES.items():
            m = ndimage.binary_erosion(np.isin(lab, codes), iterations=1 if name in ("cartilage", "fluid") else 2)
            if m.sum() > 20:
                out[key][name] = float(np.median(img[m]))
        bone = np.isin(lab, [1, 2])
        out[key]["trabecular bone region"] = float(np.median(img[ndimage.binary_erosion(bone, iterations=4)]))
    out["ct"]["cortical peak (99th pct in bone)"] = float(np.percentile(ct[np.isin(ctt, [1, 2])], 99))
    fat = out["mr"]["fat"]
    out["mr"] = {k: v / fat for k, v in out["mr"].items()}
    return out


def roi_morphometry(knee: Path) -> dict:
    import SimpleITK as sitk
    from ctsma import ROIS
    from ctsma.morphometry import measure
    res = {}
    for mod in ("ct", "mr"):
        img = sitk.ReadImage(str(knee / f"{mod}.nii.gz"), sitk.sitkFloat32)
        rois = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / f"{mod}_rois.nii.gz")))
        arr = sitk.GetArrayFromImage(img)
        sp = img.GetSpacing()[::-1]
        for name, val in ROIS.items():
            m = rois == val
            idx = np.argwhere(m)
            lo, hi = idx.min(0), idx.max(0) + 1
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            r = measure(arr[sl], sp, m[sl], modality=mod)
            res[f"{mod}_{name}"] = {p: float(r[p]) for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")}
    return res


def landmark_error(knee: Path) -> dict:
    import pandas as pd
    import SimpleITK as sitk
    from ctsma import ROIS
    from ctsma.phantom import knee_model
    tf = sitk.ReadTransform(str(knee / "transform_ct_to_mr.h5"))
    lm = pd.read_csv(knee / "landmarks.csv")
    model = knee_model(knee)
    err, same = [], 0
    for r in lm.itertuples():
        q = np.array(tf.TransformPoint((r.ct_x, r.ct_y, r.ct_z)))
        err.append(float(np.abs(q - [r.mr_x, r.mr_y, r.mr_z]).max()))
        same += int(model.evaluate(q[None])["roi"][0] == ROIS[r.roi])
    return {"max_error_mm": max(err), "n": len(err), "same_roi": same}


def auc_cv(X: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    k = int(min(5, np.bincount(y).min()))
    if k < 2:
        return float("nan")
    pr = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)), X, y,
                           cv=StratifiedKFold(k, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    return float(roc_auc_score(y, pr))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cohort", default="/tmp/ctsma_phantom_bench")
    ap.add_argument("--auc-knees", type=int, default=0, help="extra truth-only knees for the AUC estimate")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="only the speed/memory part")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "phantom.json"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from scipy.stats import spearmanr

    from ctsma import PARAMETERS, ROIS
    from ctsma.phantom import generate_cohort, load_manifest, make_settings
    from ctsma.stats.agreement import icc21
    report: dict = {"machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}}
    if not a.skip_speed:
        report["speed"] = {p: speed(p) for p in ("demo", "full")}
    if a.speed_only:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return 0
    t0 = time.perf_counter()
    generate_cohort(make_settings("demo"), a.n, a.seed, a.cohort, workers=a.workers)
    report["cohort"] = {"n": a.n, "seed": a.seed, "folder": a.cohort, "seconds": time.perf_counter() - t0}
    df = load_manifest(a.cohort)
    tissues, morph, lms = [], [], []
    for row in df.itertuples():
        knee = Path(row.mr).parent
        tissues.append(tissue_stats(knee))
        morph.append(roi_morphometry(knee))
        lms.append(landmark_error(knee))
    rep = {}
    for key, ranges in (("ct", HU_RANGES), ("mr", MR_RANGES)):
        rep[key] = {}
        for t, (lo, hi) in ranges.items():
            v = np.array([ts[key].get(t, np.nan) for ts in tissues])
            rep[key][t] = {"median": float(np.nanmedian(v)), "min": float(np.nanmin(v)), "max": float(np.nanmax(v)),
                           "range": [lo, hi], "ok": bool(np.nanmin(v) >= lo - 1e-9 and np.nanmax(v) <= hi + 1e-9)}
    report["intensities"] = rep
    agree = {}
    for mod in ("ct", "mr"):
        agree[mod] = {}
        for p in PARAMETERS:
            truth = np.array([df.loc[i, f"true_{roi}_{p}"] for i in range(len(df)) for roi in ROIS], float)
            meas = np.array([m[f"{mod}_{roi}"][p] for m in morph for roi in ROIS])
            ok = np.isfinite(truth) & np.isfinite(meas)
            agree[mod][p] = {"icc21": float(icc21(truth[ok], meas[ok]).value),
                             "spearman": float(spearmanr(truth[ok], meas[ok]).statistic),
                             "mean_truth": float(truth[ok].mean()), "mean_measured": float(meas[ok].mean()),
                             "n": int(ok.sum())}
    report["morphometry_vs_truth"] = agree
    report["landmarks"] = {"max_error_mm": max(x["max_error_mm"] for x in lms),
                           "n": sum(x["n"] for x in lms), "same_roi": sum(x["same_roi"] for x in lms)}
    cols = [f"true_{r}_{p}" for r in ROIS for p in PARAMETERS]
    X, y = df[cols].to_numpy(float), df["oa"].to_numpy(int)
    report["auc_true_params"] = {"cohort": auc_cv(X, y), "n": len(y), "oa": int(y.sum())}
    if a.auc_knees > 0:
        from ctsma.phantom.anatomy import KneeModel
        from ctsma.phantom.subject import sample_subject
        from ctsma.phantom.truth import measure_truth
        s = make_settings("demo")
        Xs, ys = [], []
        for i in range(a.auc_knees):
            p = sample_subject(s, a.seed + 1, i)
            tr, _ = measure_truth(KneeModel(p), s, np.random.Generator(np.random.PCG64(p["noise_seed"])))
            Xs.append([tr[r][q] for r in ROIS for q in PARAMETERS])
            ys.append(p["oa"])
        report["auc_true_params"]["truth_only"] = auc_cv(np.array(Xs), np.array(ys))
        report["auc_true_params"]["truth_only_n"] = a.auc_knees
    report["machine"]["load_average_end"] = os.getloadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2))
    # ---- table -------------------------------------------------------------------------------
    print(f"\nPhantom benchmark ({os.cpu_count()} CPUs, load {report['machine']['load_average_start'][0]:.1f})")
    if "speed" in report:
        print(f"{'preset':8} {'wall s':>8} {'cpu s':>8} {'1st wall':>9} {'peak MB':>8}   target")
        for p, r in report["speed"].items():
            print(f"{p:8} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['first_wall_s']:9.1f} {r['peak_rss_mb']:8.0f}   "
                  f"{'<= 15 s' if p == 'demo' else '<= 60 s'}, <= 6000 MB")
    for key, unit in (("ct", "HU"), ("mr", "x fat")):
        print(f"\n{key.upper()} per tissue ({unit}): median [min, max] over knees vs documented range")
        for t, r in rep[key].items():
            print(f"  {t:34} {r['median']:8.2f} [{r['min']:8.2f}, {r['max']:8.2f}]  range {r['range']}  "
                  f"{'ok' if r['ok'] else 'OUT'}")
    print("\nROI morphometry on the images vs truth (16 knees x 4 ROIs)")
    for mod in ("ct", "mr"):
        for p, r in agree[mod].items():
            print(f"  {mod} {p:6} ICC(2,1) {r['icc21']:6.3f}  Spearman {r['spearman']:6.3f}  "
                  f"mean truth {r['mean_truth']:.3f} measured {r['mean_measured']:.3f}")
    print(f"\nlandmarks: max |T(ct) - mr| = {report['landmarks']['max_error_mm']:.2e} mm over "
          f"{report['landmarks']['n']} points; same ROI {report['landmarks']['same_roi']}/{report['landmarks']['n']}")
    print(f"AUC (CV logistic regression on true ROI parameters): {report['auc_true_params']}")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
