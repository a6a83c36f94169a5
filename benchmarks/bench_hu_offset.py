"""How do the CT-only estimates move with the CT's HU calibration?  (held-out phantom knees)

A student reads HU, so a scanner that reads bone some HU higher or lower (another calibration, tube voltage or
reconstruction) moves its estimates, and so does the knee's own bone tissue and marrow (docs/training.md, *The
knee's own tissue HU*). Knees of a cohort seed the demo never used are simulated with the demo's CT settings;
each CT is then offset by a constant number of HU (everywhere, so the bones and ROIs are found the same way), and
``ctsma infer`` runs on each version (automatic bones and ROIs, default model and settings). Per offset:

* the mean shift of the ROI means against the unshifted CT, in units of the parameter's SD across knees and ROIs
  of the unshifted CTs, and the shift per 100 HU in the parameter's units;
* ICC(2,1) with the unshifted CT's ROI means;
* the knee's intensity statistic and how many knees got ``infer``'s warning that their bone is unlike the model's
  training knees (:mod:`ctsma.inference.intensity`), or were refused (an offset that lifts soft tissue above the
  bone threshold leaves no knee to find).

    .venv/bin/python benchmarks/bench_hu_offset.py [--n 8] [--seed 101] [--offsets -200 -100 -50 0 50 100 200]
                                                   [--model FILE] [--work DIR] [--tag NAME]

Writes ``benchmarks/results/bench_hu_offset[_<tag>].json``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctsma import PARAMETERS  # noqa: E402
from ctsma.errors import UserError  # noqa: E402
from ctsma.inference.engine import InferSettings, infer  # noqa: E402
from ctsma.stats.agreement import icc_value  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--offsets", type=int, nargs="+", default=[-200, -100, -50, 0, 50, 100, 200])
    ap.add_argument("--model", default=None, help="student model file (default: the shipped demo student)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    if 0 not in a.offsets:
        raise SystemExit("--offsets must include 0 (the reference)")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ctsma_hu_offset_"))
    t0 = time.time()
    cohort = work / "cohort"
    if not (cohort / "manifest.csv").is_file():
        subprocess.run([str(Path(sys.executable).parent / "ctsma"), "phantom", "--n", str(a.n), "--seed", str(a.seed),
                        "--out", str(cohort), "--workers", str(a.workers)], check=True)
    import SimpleITK as sitk

    man = pd.read_csv(cohort / "manifest.csv", dtype={"subject": str})
    rows, knees, band = [], [], None
    for r in man.itertuples():
        ct = sitk.ReadImage(str(cohort / r.ct))
        for off in a.offsets:
            path = work / "ct" / f"{r.subject}_{off:+d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.Cast(sitk.Cast(ct, sitk.sitkInt32) + int(off), sitk.sitkInt16), str(path))
            out = work / "out" / f"{r.subject}_{off:+d}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    summ = infer(path, out, model_path=a.model, settings=InferSettings(side=r.side), subject=r.subject)
            except UserError as exc:  # e.g. soft tissue lifted above the bone threshold: no knee found
                knees.append({"subject": r.subject, "offset_hu": off, "knee_hu": None, "warned": False,
                              "n_patches": 0, "error": str(exc)})
                print(f"  {r.subject} {off:+4d} HU: refused: {exc}", flush=True)
                continue
            band = summ["ct_intensity"].get("model_band_hu")
            told = [w for w in summ["warnings"] if "than the model's training knees" in w]
            knees.append({"subject": r.subject, "offset_hu": off, "knee_hu": summ["ct_intensity"]["knee_hu"],
                          "warned": bool(told), "n_patches": summ["n_patches"]})
            tab = pd.read_csv(out / "roi_table.csv")
            rows += [{"subject": r.subject, "offset_hu": off, "roi": t.roi, "parameter": t.parameter, "value": t.mean}
                     for t in tab.itertuples()]
            print(f"  {r.subject} {off:+4d} HU: knee {knees[-1]['knee_hu']:.0f} HU"
                  + (" (warned)" if told else ""), flush=True)
    df, kn = pd.DataFrame(rows), pd.DataFrame(knees)
    ref = df[df.offset_hu == 0]
    result = {"n_knees": int(man.shape[0]), "cohort_seed": a.seed, "model": a.model or "shipped demo student",
              "model_band_hu": band, "offsets": {}}
    print(f"{'offset':>7s} " + " ".join(f"{p + ' (SD)':>12s}" for p in PARAMETERS) + "   ICC(2,1) mean   warned")
    for off in a.offsets:
        m = df[df.offset_hu == off].merge(ref, on=["subject", "roi", "parameter"], suffixes=("", "_0"))
        if m.subject.nunique() < 3:
            print(f"{off:+7d} fewer than 3 knees analysed")
            continue
        block = {}
        for p in PARAMETERS:
            s = m[m.parameter == p].dropna()
            sd = float(s.value_0.std(ddof=1))
            shift = float((s.value - s.value_0).mean())
            block[p] = {"shift": shift, "shift_sd": shift / sd, "per_100_hu": shift / off * 100 if off else 0.0,
                        "icc21": float(icc_value(s.value_0, s.value)), "sd_across_knee_rois": sd}
        k = kn[kn.offset_hu == off]
        refused = int(k.knee_hu.isna().sum())
        result["offsets"][str(off)] = {"parameters": block, "mean_icc21": float(np.mean([block[p]["icc21"] for p in PARAMETERS])),
                                       "knee_hu_mean": float(k.knee_hu.mean()), "warned": int(k.warned.sum()),
                                       "refused": refused}
        print(f"{off:+7d} " + " ".join(f"{block[p]['shift_sd']:+12.2f}" for p in PARAMETERS)
              + f"   {result['offsets'][str(off)]['mean_icc21']:.3f}          {int(k.warned.sum())}/{len(k)}"
              + (f" ({refused} refused)" if refused else ""))
    result["knees"] = kn.to_dict(orient="records")
    result["seconds"] = round(time.time() - t0, 1)
    out = ROOT / "benchmarks" / "results" / f"bench_hu_offset{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
