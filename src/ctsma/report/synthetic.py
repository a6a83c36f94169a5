"""Realistic synthetic report inputs, for previews and the tests (no real results in here).

``python -m ctsma.report.synthetic OUT`` writes a study report, a patient report and the README
snippet from these inputs to ``OUT`` so the layout can be checked before real numbers exist.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import PARAMETERS, ROIS
from ..evaluation.regression import SOURCES

TYPICAL = {"BV/TV": (0.28, 0.05), "Tb.Th": (0.16, 0.025), "Tb.Sp": (0.70, 0.12), "Tb.N": (1.40, 0.20)}


def cohort(n: int = 24, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    kl = rng.integers(0, 5, n)
    df = pd.DataFrame({"subject": [f"K{i:03d}" for i in range(n)], "side": rng.choice(["L", "R"], n),
                       "kl_grade": kl, "oa": (kl >= 2).astype(int),
                       "severity": np.round(kl * 1.6 + rng.normal(0, 0.6, n).clip(-1, 1), 2).clip(0)})
    for roi in ROIS:
        for p, (mu, sd) in TYPICAL.items():
            sign = -1 if p in ("BV/TV", "Tb.Th", "Tb.N") else 1
            df[f"true_{roi}_{p}"] = mu + sign * 0.4 * sd * (kl - 2) + rng.normal(0, sd * 0.6, n)
    return df


def predictions(seed: int = 0, n_patients: int = 8, per_roi: int = 12) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_patients):
        for roi in ROIS:
            for _ in range(per_roi):
                for p, (mu, sd) in TYPICAL.items():
                    rows.append((f"K{s:03d}", roi, p, mu + rng.normal(0, sd)))
    base = pd.DataFrame(rows, columns=["subject", "roi", "param", "reference"])
    out = {}
    for k, (noise, bias) in {"teacher": (0.25, 0.0), "student_distilled": (0.5, 0.02),
                             "student_baseline": (0.8, -0.05)}.items():
        sd = base["param"].map(lambda p: TYPICAL[p][1])
        out[k] = base.assign(predicted=base["reference"] + sd * (bias + noise * rng.standard_normal(len(base))))
    return out


def roc(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(30), np.ones(30)]
    out = {}
    for key, sep in {"student_distilled/transformer": 1.6, "student_baseline/transformer": 0.9,
                     "mr_reference/transformer": 2.0, "student_distilled/mlp": 1.2,
                     "truth/logistic": 2.6}.items():
        out[key] = {"y_true": y, "y_score": rng.normal(0, 1, y.size) + sep * y}
    return out


def metrics(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def block(level):
        out = {}
        for s, base in zip(SOURCES, level):
            d = {}
            for p, (mu, sd) in TYPICAL.items():
                icc = float(np.clip(base + rng.normal(0, 0.04), 0, 0.99))
                d[p] = {"icc21": icc, "icc21_ci": [icc - 0.08, min(0.995, icc + 0.06)], "icc31": min(0.99, icc + 0.01),
                        "icc31_ci": [icc - 0.07, min(0.995, icc + 0.06)], "pearson_r": min(0.995, icc + 0.02),
                        "mae": sd * (1.1 - icc), "ba_bias": sd * rng.normal(0, 0.1),
                        "ba_loa": [-sd * (1.2 - icc) * 2, sd * (1.2 - icc) * 2], "n_patients": 8, "n_patches": 384}
            d["mean_icc21"] = float(np.mean([d[p]["icc21"] for p in PARAMETERS]))
            out[s] = d
        return out
    m = {"regression": block((0.93, 0.82, 0.71, 0.55)), "regression_vs_truth": block((0.9, 0.8, 0.7, 0.6)),
         "distillation_gain": {"mean_icc21_diff": 0.11, "ci": [0.05, 0.17]},
         "diagnosis": {}, "registration": {
             "rigid": {"tre_mean_mm": 2.41, "tre_p95_mm": 4.9, "seconds_per_knee": 3.2},
             "rigid+per-bone": {"tre_mean_mm": 0.92, "tre_p95_mm": 1.8, "seconds_per_knee": 11.5},
             "synthesis+per-bone+bspline": {"tre_mean_mm": 0.48, "tre_p95_mm": 0.97, "seconds_per_knee": 41.0}},
         "timing": {"phantom": 62.0, "registration": 505.3, "patch_extraction": 88.1, "teacher_training": 1420.5,
                    "student_training": 2210.0, "evaluation": 95.2}}
    for key, (auc, f1) in {"student_distilled/transformer": (0.87, 0.84), "student_distilled/mlp": (0.8, 0.77),
                           "student_baseline/transformer": (0.76, 0.72), "ct_direct/logistic": (0.7, 0.66),
                           "mr_reference/transformer": (0.91, 0.88), "truth/logistic": (0.95, 0.92)}.items():
        m["diagnosis"][key] = {"auc": auc, "auc_ci": [auc - 0.08, min(1, auc + 0.06)], "accuracy": f1 + 0.02,
                               "sensitivity": f1 + 0.03, "specificity": f1 - 0.02, "f1": f1, "precision": f1 - 0.03,
                               "brier": 0.25 - auc / 5, "severity_mae": 2.2 - 1.5 * auc, "severity_r2": auc - 0.05,
                               "n": 60}
    m["diagnosis"]["student_distilled/transformer"].update(   # as compare_sources adds them
        {"auc_diff_vs_student_baseline": 0.11, "auc_diff_ci_vs_student_baseline": [0.01, 0.21],
         "p_auc_vs_student_baseline": 0.031})
    # a few nulls, as JSON NaN -> null gives them
    m["regression"]["ct_direct"]["Tb.N"]["icc21_ci"] = [None, None]
    m["regression"]["ct_direct"]["Tb.N"]["pearson_r"] = None
    m["diagnosis"]["ct_direct/logistic"]["severity_r2"] = None
    return m


def knee(shape_xyz=(72, 40, 84), spacing=(0.75, 0.75, 0.75), seed: int = 0, direction=None):
    """A small knee-like CT (HU) with ROI labels and four parameter maps (NaN outside the ROIs)."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_xyz
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip((nz, ny, nx), spacing[::-1])), indexing="ij")
    cx, cy, cz = nx * spacing[0] / 2, ny * spacing[1] / 2, nz * spacing[2] / 2
    ct = np.full(z.shape, -900.0)
    body = (x - cx) ** 2 / (0.48 * nx * spacing[0]) ** 2 + (y - cy) ** 2 / (0.48 * ny * spacing[1]) ** 2 < 1
    ct[body] = 40
    gap = cz - 2
    femur = np.zeros(z.shape, bool)
    for dx in (-11, 11):
        femur |= (x - cx - dx) ** 2 + (y - cy) ** 2 * 1.4 + (z - gap - 12) ** 2 < 11.5 ** 2
    femur |= (np.abs(x - cx) < 9) & ((y - cy) ** 2 < 64) & (z > gap + 12)
    tibia = (np.abs(x - cx) < 25) & ((y - cy) ** 2 < 110) & (z < gap - 3) & (z > 4)
    bone = femur | tibia
    ct[bone] = 320 + rng.normal(0, 60, bone.sum())
    shell = bone & ~(sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(bone.astype(np.uint8)),
                                                             [2, 2, 2])) > 0)
    ct[shell] = 1250
    ct += rng.normal(0, 15, ct.shape)
    rois = np.zeros(z.shape, np.uint8)
    inner = bone & ~shell
    rois[inner & femur & (z < gap + 12) & (x >= cx)] = ROIS["MFC"]
    rois[inner & femur & (z < gap + 12) & (x < cx)] = ROIS["LFC"]
    rois[inner & tibia & (z > gap - 13) & (x >= cx)] = ROIS["MTP"]
    rois[inner & tibia & (z > gap - 13) & (x < cx)] = ROIS["LTP"]

    def image(a, pixel):
        img = sitk.GetImageFromArray(a.astype(pixel))
        img.SetSpacing(spacing)
        img.SetOrigin((-cx, -cy, -cz))
        if direction is not None:
            img.SetDirection(direction)
        return img
    maps = {}
    for i, (p, (mu, sd)) in enumerate(TYPICAL.items()):
        field = mu + sd * (np.sin(x / 7 + i) + np.cos(z / 9 - i) + 0.3 * rng.standard_normal(z.shape))
        maps[p] = image(np.where(rois > 0, field, np.nan), np.float32)
    return image(ct, np.float32), image(rois, np.uint8), maps


def roi_table(rois_img, maps) -> pd.DataFrame:
    lab = sitk.GetArrayViewFromImage(rois_img)
    rows = []
    for roi, v in ROIS.items():
        for p, img in maps.items():
            vals = sitk.GetArrayViewFromImage(img)[lab == v]
            vals = vals[np.isfinite(vals)]
            q1, q3 = np.percentile(vals, [25, 75])
            rows.append((roi, p, vals.mean(), vals.std(ddof=1), np.median(vals), q3 - q1, int(vals.size // 50)))
    return pd.DataFrame(rows, columns=["roi", "parameter", "mean", "sd", "median", "iqr", "n_patches"])


def reference_ranges() -> pd.DataFrame:
    rows = [(roi, p, mu * (1.05 if p != "Tb.Sp" else 0.93), sd * 0.5) for roi in ROIS
            for p, (mu, sd) in TYPICAL.items()]
    return pd.DataFrame(rows, columns=["roi", "parameter", "mean", "sd"])


def diagnosis() -> dict:
    return {"oa_probability": 0.73, "severity": 4.1, "auc": 0.87, "auc_ci": [0.79, 0.93], "severity_mae": 0.9,
            "severity_r2": 0.82, "aggregator": "transformer", "n_train": 48}


def provenance(demo: bool = True) -> dict:
    return {"model": "ctsma-student-distilled", "version": "0.1.0-demo", "trained_on":
            "digital knee phantom, 48 knees (seed 0)", "demo": demo, "created": "2026-11-25",
            "sha256": "3f9a" * 16}


def main(argv=None) -> int:  # pragma: no cover - a preview tool
    from .patient import write_patient_report
    from .paths import PATIENT_REPORT_FORMATS, patient_report_path
    from .readme import write_readme_snippet
    from .study import write_study_report
    out = (argv or sys.argv[1:] or ["report-preview"])[0]
    print(write_study_report(metrics(), out, cohort=cohort(), predictions=predictions(), roc=roc()))
    ct, rois, maps = knee()
    paths = {f: patient_report_path(out, "K007", f) for f in PATIENT_REPORT_FORMATS}
    print(write_patient_report(paths, ct=ct, rois=rois, maps=maps, roi_table=roi_table(rois, maps),
                               reference_ranges=reference_ranges(), diagnosis=diagnosis(), provenance=provenance(),
                               subject="K007"))
    print(write_readme_snippet(metrics(), f"{out}/readme"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
