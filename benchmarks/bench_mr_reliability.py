"""How reproducible is the MR reference itself?  Scan-rescan of the phantom's BFFE MR (issues 7 and 8).

Every CT model is scored against MR reference parameters, which are measured on one noisy MR scan. The part of a
reference that another scan of the same knee would not repeat is noise that no CT model can predict, so the
scan-rescan reliability of the reference bounds the agreement any CT model can reach.

For every knee of a finished demo run, the knee's MR is simulated again from the phantom's own model (same
anatomy, microstructure, pose and MR grid, so the registrations and patch positions of the demo still hold):

* ``original``: the knee's own random stream (a check: every knee's image must equal the demo's ``mr.nii.gz``, and
  the store built from them the demo's store);
* ``rescan``: another random stream, i.e. new Rician noise and a new smooth bias field, as in a second scan
  without repositioning;
* ``snr1000``: the knee's own stream (the same bias field) with the noise 45 times lower (SNR 1000 instead of
  22): what the reference would be without MR noise.

Each version goes through ``ctsma dataset build`` with the demo's settings and registrations (``--no-truth``), and
the references of the same patches (matched on subject, ROI and centre) are compared per parameter: ICC(2,1) and
Pearson r between ``original`` and ``rescan`` (the reliability ``rel``), and between ``original`` and ``snr1000``.
Also at ROI level (the mean reference of a knee's patches in an ROI, as issue 8 compares them).

What the reliability bounds. Write a reference as ``ref = s + e``, with ``e`` the part a rescan does not repeat
(independent of the CT) and ``rel = corr(ref1, ref2) = var(s) / var(ref)``. Any prediction ``m`` made from the CT
has ``corr(m, ref) <= sqrt(rel)``, and ICC(2,1) ``<= corr``, so ``sqrt(rel)`` bounds the ICC of every CT model
(reached only by a perfect, stretched estimate of ``s``); the perfect unstretched one, ``m = s``, scores
``2 rel / (1 + rel)``. These bound the noise only: a CT model also cannot see what the MR's partial volume does
to each trabecula, so real models stay below them (see docs/dataset.md, R).

    .venv/bin/python benchmarks/bench_mr_reliability.py DEMO_DIR [--work DIR] [--workers 2] [--tag NAME]

Writes ``benchmarks/results/bench_mr_reliability[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("original", "rescan", "snr1000")


def simulate_variant(meta_path: str, variant: str, out_path: str) -> dict:
    """Write ``out_path`` (mr.nii.gz) for one knee and variant; returns a few facts about it."""
    import dataclasses

    import SimpleITK as sitk

    from ctsma.phantom.anatomy import KneeModel
    from ctsma.phantom.imaging import simulate_mr
    from ctsma.phantom.settings import from_dict
    from ctsma.phantom.subject import sample_subject

    meta = json.loads(Path(meta_path).read_text())
    settings = from_dict(meta["settings"])
    p = sample_subject(settings, int(meta["seed"]), int(meta["index"]))
    if p["noise_seed"] != meta["subject"]["noise_seed"]:
        raise SystemExit(f"{meta_path}: the phantom code no longer regenerates this knee (noise seed differs)")
    seed = p["noise_seed"]
    if variant == "rescan":
        rng = np.random.Generator(np.random.PCG64([seed, 20261127]))
    else:
        rng = np.random.Generator(np.random.PCG64(seed))
    if variant == "snr1000":
        settings = dataclasses.replace(settings, mr_snr=1000.0)
    t0 = time.perf_counter()
    images, info = simulate_mr(KneeModel(p), settings, rng)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(images["mr"], out_path, True, 1)
    return {"seconds": time.perf_counter() - t0, "noise_sigma": info["noise_sigma"]}


def variant_manifest(phantom: Path, work: Path, variant: str) -> Path:
    """The demo's manifest with absolute paths and ``mr`` pointing at the variant's image."""
    rows = list(csv.DictReader(open(phantom / "manifest.csv", newline="")))
    out = work / variant / "manifest.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    path_cols = [c for c in rows[0] if rows[0][c].startswith(rows[0]["subject"] + "/")]
    for r in rows:
        for c in path_cols:
            r[c] = str(phantom / r[c])
        r["mr"] = str(work / variant / r["subject"] / "mr.nii.gz")
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    from ctsma.stats import icc21, pearson_r

    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    r = float(pearson_r(a, b))
    return {"icc21": round(float(icc21(a, b).value), 4), "pearson_r": round(r, 4), "n": int(ok.sum()),
            "cv_percent": round(float(100 * np.std(a - b, ddof=1) / np.sqrt(2) / np.mean(np.r_[a, b])), 2)}


def _no_nan(x):
    """NaN as null, so that the file is valid JSON."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def main():
    import dataclasses

    import SimpleITK as sitk

    from ctsma import PARAMETERS
    from ctsma.dataset.build import build_dataset
    from ctsma.dataset.store import PatchStore
    from ctsma.demo.stages import dataset_settings
    from ctsma.processes import run_jobs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", type=Path, help="a finished demo's output folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctsma_mr_reliability"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=None, help="the demo's seed (default: read from its phantom)")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    phantom, reg = a.demo / "phantom", a.demo / "registration" / "cohort"
    subjects = [r["subject"] for r in csv.DictReader(open(phantom / "manifest.csv", newline=""))]
    seed = a.seed if a.seed is not None else json.loads((phantom / subjects[0] / "metadata.json").read_text())["seed"]
    stamp = {"demo": str(a.demo.resolve()), "seed": seed, "subjects": subjects}
    stamp_path = a.work / "work_of.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) != stamp:
        raise SystemExit(f"{a.work} holds the outputs of another demo ({stamp_path}); give another --work")
    a.work.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp))
    t0 = time.perf_counter()
    jobs = [(str(phantom / s / "metadata.json"), v, str(a.work / v / s / "mr.nii.gz"))
            for v in VARIANTS for s in subjects]
    todo = [j for j in jobs if not Path(j[2]).is_file()]
    reused = len(todo) < len(jobs)
    print(f"simulating {len(todo)} MR images ...", flush=True)
    run_jobs(simulate_variant, todo, a.workers)
    differ = [s for s in subjects if not np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(a.work / "original" / s / "mr.nii.gz"))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / s / "mr.nii.gz"))))]
    print(f"regenerated MRs equal to the demo's: {len(subjects) - len(differ)} of {len(subjects)}", flush=True)
    if differ:
        raise SystemExit(f"the phantom code no longer regenerates the demo's MR of {differ[:3]}; rerun the demo first")
    t_sim = time.perf_counter() - t0

    demo = SimpleNamespace(s=SimpleNamespace(seed=seed))  # the part of the demo's context that dataset_settings reads
    settings = dataclasses.replace(dataset_settings(demo), truth=False)
    tables = {}
    for v in VARIANTS:
        store = a.work / v / "store"
        reused |= (store / "patches.csv").is_file()
        if not (store / "patches.csv").is_file():
            man = phantom / "manifest.csv" if v == "original" else variant_manifest(phantom, a.work, v)
            print(f"building the {v} store ...", flush=True)
            build_dataset(man, store, settings, registrations=reg, workers=a.workers)
        tables[v] = PatchStore(store).table
    t_all = time.perf_counter() - t0
    key = ["subject", "roi", "centre_x", "centre_y", "centre_z"]
    for v, t in tables.items():
        t["subject"] = t["subject"].astype(str)
        tables[v] = t.set_index(key)
    base = tables["original"]
    demo_table = PatchStore(a.demo / "dataset" / "store").table
    demo_table["subject"] = demo_table["subject"].astype(str)
    demo_table = demo_table.set_index(key)
    cols = [f"mr_{p}" for p in PARAMETERS]
    same_store = bool(demo_table.index.equals(base.index) and demo_table[cols].equals(base[cols]))
    print(f"the rebuilt original store equals the demo's (patches and MR references): {same_store}", flush=True)
    res = {"demo": str(a.demo), "seed": seed, "knees": len(subjects),
           "regenerated_mr_equals_demo": f"{len(subjects)} of {len(subjects)} knees",
           "rebuilt_original_store_equals_demo_store": same_store,
           "reused_earlier_outputs_of_work_dir": bool(reused),
           "simulate_s": None if reused else round(t_sim, 1), "total_s": None if reused else round(t_all, 1),
           "patches": {v: int(len(t)) for v, t in tables.items()}}
    for v in ("rescan", "snr1000"):
        m = base.join(tables[v].add_suffix("_b"), how="inner")
        res[f"original_vs_{v}"] = out = {"matched_patches": int(len(m))}
        roi = m.groupby(["subject", "roi"]).mean(numeric_only=True)
        for p in PARAMETERS:
            pa, pb = m[f"mr_{p}"].to_numpy(float), m[f"mr_{p}_b"].to_numpy(float)
            ra, rb = roi[f"mr_{p}"].to_numpy(float), roi[f"mr_{p}_b"].to_numpy(float)
            out[p] = {"patches": agreement(pa, pb), "roi_means": agreement(ra, rb)}
        for level in ("patches", "roi_means") if v == "rescan" else ():
            rel = np.clip([out[p][level]["pearson_r"] for p in PARAMETERS], 0.0, 1.0)  # NaN stays NaN (null)
            out[f"{level}_bound"] = {
                "sqrt_rel": dict(zip(PARAMETERS, np.round(np.sqrt(rel), 3).tolist())),
                "mean_sqrt_rel": round(float(np.sqrt(rel).mean()), 3),
                "two_rel_over_one_plus_rel": dict(zip(PARAMETERS, np.round(2 * rel / (1 + rel), 3).tolist())),
                "mean_two_rel_over_one_plus_rel": round(float((2 * rel / (1 + rel)).mean()), 3)}
    name = f"bench_mr_reliability{'_' + a.tag if a.tag else ''}.json"
    path = ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(_no_nan(res), indent=1) + "\n")
    for v in ("rescan", "snr1000"):
        o = res[f"original_vs_{v}"]
        print(f"original vs {v} ({o['matched_patches']} patches): " + ", ".join(
            f"{p} r {o[p]['patches']['pearson_r']:.3f} (ROI {o[p]['roi_means']['pearson_r']:.3f})" for p in PARAMETERS))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
