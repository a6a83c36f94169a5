"""How do the CT-only estimates move when the CT scanner settings change?  (held-out phantom settings)

The same knees (a cohort seed the demo never used, so new patients for the shipped demo model) are simulated
with the demo's CT settings and with CT settings the model never saw: more noise, a sharper or a softer
reconstruction kernel, finer or thicker voxels. The microstructure, the MR and the truth of a knee depend only on
the cohort seed and the knee's index, so only the CT differs between settings. ``ctsma infer`` runs on each CT
(automatic bones and ROIs, default model, default settings), and its ROI means are compared

* with the same knee's ROI means under the demo's CT settings: ICC(2,1) (do two scanners give the same value?)
  and the mean difference in units of the parameter's SD across knees and ROIs (a systematic shift);
* with the phantom's true ROI values: Pearson r (the MR-derived values the model learns are apparent, on another
  scale, so only r is meaningful against the truth);
* and the knee's OA probability from the shipped diagnosis model (or ``--diagnosis-model``): the mean absolute
  change against the demo's CT settings, and how many knees change sides of 0.5.

Each setting runs twice: as ``ctsma infer`` does by default (a CT sharper in-plane than the model's training CTs is
blurred to their sharpness, :mod:`ctsma.harmonise`) and with ``--no-harmonise`` (the CT as it is).

    .venv/bin/python benchmarks/bench_ct_shift.py [--n 8] [--seed 101] [--model FILE] [--work DIR] [--tag NAME]
    .venv/bin/python benchmarks/bench_ct_shift.py --settings validation --seed 202 --tag validation

Writes ``benchmarks/results/bench_ct_shift[_<tag>].json``. The phantoms go to ``--work`` (default a temporary
folder, removed at the end; about 18 MB per knee and setting).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ctsma import PARAMETERS, ROIS
from ctsma.inference.engine import InferSettings, default_diagnosis_path, default_model_path, infer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_roi_agreement import icc_table  # noqa: E402

# CT settings (phantom overrides); "demo" is the training distribution
SETTINGS = {
    "demo": {},
    "noise_x2": {"ct_noise_hu": 44.0},
    "sharp_kernel": {"ct_psf_fwhm_mm": [0.6, 0.6, 1.0]},
    "soft_kernel": {"ct_psf_fwhm_mm": [1.2, 1.2, 1.7]},
    "fine_voxels": {"ct_spacing": [0.4, 0.4, 0.7], "ct_psf_fwhm_mm": [0.7, 0.7, 1.0]},
    "thick_slices": {"ct_spacing": [0.6, 0.6, 1.5], "ct_psf_fwhm_mm": [0.9, 0.9, 1.8]},
}
# A second set, fixed before it was run, to check the through-plane and pixel-size matching (added after the first
# set's fine-voxel results) on settings and knees it was not developed on: --settings validation --seed 202
VALIDATION = {
    "demo": {},
    "fine_pixels": {"ct_spacing": [0.4, 0.4, 1.0]},                                   # pixel size alone
    "thin_slices": {"ct_spacing": [0.6, 0.6, 0.6], "ct_psf_fwhm_mm": [0.9, 0.9, 1.0]},  # slices alone
    "fine_voxels_b": {"ct_spacing": [0.45, 0.45, 0.8], "ct_psf_fwhm_mm": [0.8, 0.8, 1.1]},
}


def make_cohort(work: Path, name: str, over: dict, n: int, seed: int, workers: int) -> Path:
    out = work / name
    if (out / "manifest.csv").is_file():
        return out
    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(over or {"ct_noise_hu": 22.0}))
    subprocess.run([str(Path(sys.executable).parent / "ctsma"), "phantom", "--n", str(n), "--seed", str(seed), "--out", str(out),
                    "--workers", str(workers), "--config", str(cfg)], check=True)
    return out


def roi_means(cohort: Path, model: Path, tmp: Path, harmonise: bool, diagnosis) -> tuple[pd.DataFrame, list]:
    man = pd.read_csv(cohort / "manifest.csv", dtype={"subject": str})
    rows, res = [], []
    for r in man.itertuples():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summ = infer(cohort / r.ct, tmp / r.subject, model_path=model,
                         settings=InferSettings(side=r.side, harmonise=harmonise), diagnosis_path=diagnosis,
                         subject=r.subject)
        res.append({**summ["ct_resolution"], "subject": r.subject, "oa_probability": summ.get("oa_probability")})
        tab = pd.read_csv(tmp / r.subject / "roi_table.csv")
        rows += [{"subject": r.subject, "roi": t.roi, "parameter": t.parameter, "value": t.mean}
                 for t in tab.itertuples()]
    return pd.DataFrame(rows), res


def compare(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """ICC(2,1) and r of the ROI means (the ROI-agreement benchmark's table), and the mean shift b - a in SDs of a."""
    out = icc_table(a, b)
    m = a.merge(b, on=["subject", "roi", "parameter"], suffixes=("_a", "_b"))
    for p in PARAMETERS:
        s = m[m.parameter == p].dropna()
        out[p]["shift_sd"] = round(float((s.value_b - s.value_a).mean() / s.value_a.std(ddof=1)), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=101, help="cohort seed (not the demo's 0)")
    ap.add_argument("--model", default=None, help="student model file (default: the shipped demo model)")
    ap.add_argument("--diagnosis-model", default=None, help="diagnosis model file (default: the shipped one)")
    ap.add_argument("--work", default=None, help="keep the phantoms here (default: a temporary folder)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--settings", choices=("protocols", "validation"), default="protocols",
                    help="the CT settings: the first set, or the validation set (see VALIDATION)")
    a = ap.parse_args()
    settings = SETTINGS if a.settings == "protocols" else VALIDATION
    model = Path(a.model) if a.model else default_model_path()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ctshift_"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model), "seed": a.seed,
           "n_knees": a.n, "settings": settings, "results": {}}
    try:
        means, probs, truth = {}, {}, None
        diagnosis = default_diagnosis_path() if a.diagnosis_model is None else Path(a.diagnosis_model)
        for name, over in settings.items():
            t0 = time.perf_counter()
            cohort = make_cohort(work, name, over, a.n, a.seed, a.workers)
            if truth is None:
                man = pd.read_csv(cohort / "manifest.csv", dtype={"subject": str}).set_index("subject")
                truth = pd.DataFrame([{"subject": s, "roi": r, "parameter": p, "value": man.loc[s, f"true_{r}_{p}"]}
                                      for s in man.index for r in ROIS for p in PARAMETERS])
            block = {}
            for mode, harm in (("harmonised", True), ("as_is", False)):
                with tempfile.TemporaryDirectory() as tmp:
                    means[name, mode], res_info = roi_means(cohort, model, Path(tmp), harm, diagnosis)
                b = {"vs_truth": compare(truth, means[name, mode])}
                probs[name, mode] = np.array([x["oa_probability"] for x in res_info], dtype=float)
                b["oa_probability"] = [round(float(p), 3) for p in probs[name, mode]]
                if name != "demo":
                    b["vs_demo_settings"] = compare(means["demo", mode], means[name, mode])
                    d = probs[name, mode] - probs["demo", mode]
                    b["oa_probability_vs_demo_settings"] = {
                        "mean_abs_change": round(float(np.mean(np.abs(d))), 3), "mean_change": round(float(d.mean()), 3),
                        "calls_changed": int(np.sum((probs[name, mode] >= 0.5) != (probs["demo", mode] >= 0.5)))}
                if harm:
                    b["inplane_edge_sigma_mm"] = [x["inplane_edge_sigma_mm"] for x in res_info]
                    b["harmonisation_blur_mm"] = [x["harmonisation_blur_mm"] for x in res_info]
                    b["through_plane_blur_mm"] = [x["through_plane_blur_mm"] for x in res_info]
                block[mode] = b
            block["seconds"] = round(time.perf_counter() - t0, 1)
            res["results"][name] = block
            print(name, json.dumps(block), flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / f"bench_ct_shift{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"{'setting':26s} " + " ".join(f"{p:>26s}" for p in PARAMETERS))
    for name, bb in res["results"].items():
        for mode in ("as_is", "harmonised"):
            b, cells = bb[mode], []
            for p in PARAMETERS:
                r = b["vs_truth"][p]["pearson_r"]
                d = b.get("vs_demo_settings", {}).get(p)
                cells.append(f"r {r:.2f}" + (f" ICC {d['icc21']:.2f} {d['shift_sd']:+.2f} SD" if d else " " * 19))
            o = b.get("oa_probability_vs_demo_settings")
            print(f"{name + ' ' + mode:26s} " + " ".join(f"{c:>26s}" for c in cells)
                  + (f"   OA prob. |change| {o['mean_abs_change']:.2f}, calls changed {o['calls_changed']}/{a.n}"
                     if o else ""))
    print("written", out)


if __name__ == "__main__":
    main()
