"""Time the reports: .venv/bin/python benchmarks/bench_report.py [--patients 48] [--spacing 0.4]

Study report: synthetic metrics (ctsma.report.synthetic) with held-out predictions for 4 sources
(PATIENTS x 4 ROIs x 24 patches x 4 parameters) and ROC scores. Patient report: the synthetic knee
resampled to a clinical-like grid (SPACING mm in-plane, 0.6 mm slices). Prints a table and writes
benchmarks/results/bench_report.json. Wall-clock on a shared machine: note the load average printed.
"""

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ap = argparse.ArgumentParser()
ap.add_argument("--patients", type=int, default=48)
ap.add_argument("--spacing", type=float, default=0.4, help="in-plane CT spacing of the patient report (mm)")
a = ap.parse_args()

import SimpleITK as sitk  # noqa: E402

from ctsma.report import patient_report_path, synthetic, write_patient_report, write_study_report  # noqa: E402

res = {"load_average_1min": os.getloadavg()[0]}
with tempfile.TemporaryDirectory() as tmp:
    preds = synthetic.predictions(n_patients=a.patients, per_roi=24)
    preds["ct_direct"] = preds["student_baseline"].assign(predicted=preds["student_baseline"]["predicted"] * 1.1)
    t0 = time.perf_counter()
    paths = write_study_report(synthetic.metrics(), tmp, cohort=synthetic.cohort(a.patients), predictions=preds,
                               roc=synthetic.roc())
    res["study_s"] = time.perf_counter() - t0
    res["study_html_mb"] = paths["html"].stat().st_size / 1e6
    res["study_pdf_mb"] = paths["pdf"].stat().st_size / 1e6
    res["patches_per_source"] = len(preds["teacher"]) // 4

    ct, rois, maps = synthetic.knee(shape_xyz=(96, 56, 104), spacing=(1.0, 1.0, 1.0))
    sp = (a.spacing, a.spacing, 0.6)
    size = [int(n * 1.0 / s) for n, s in zip(ct.GetSize(), sp)]

    def up(img, interp, default):
        return sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), sp, img.GetDirection(), default)
    ct, rois = up(ct, sitk.sitkLinear, -1000.0), up(rois, sitk.sitkNearestNeighbor, 0)
    maps_up = {p: up(m, sitk.sitkNearestNeighbor, float("nan")) for p, m in maps.items()}
    res["patient_ct_size"] = list(size)
    t0 = time.perf_counter()
    out = write_patient_report(patient_report_path(tmp, "bench"), ct=ct, rois=rois, maps=maps_up,
                               roi_table=synthetic.roi_table(rois, maps_up),
                               reference_ranges=synthetic.reference_ranges(), diagnosis=synthetic.diagnosis(),
                               provenance=synthetic.provenance(), subject="bench")
    res["patient_s"] = time.perf_counter() - t0
    res["patient_pdf_mb"] = out.stat().st_size / 1e6
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

print(f"{'measure':<22} value")
for k, v in res.items():
    print(f"{k:<22} {v:.2f}" if isinstance(v, float) else f"{k:<22} {v}")
out_json = Path(__file__).parent / "results" / "bench_report.json"
out_json.parent.mkdir(exist_ok=True)
out_json.write_text(json.dumps(res, indent=2) + "\n")
print(f"written {out_json}")
