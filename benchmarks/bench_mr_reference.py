"""How well do MR-patch reference parameters agree with the phantom's true microstructure?

On the patches of a demo patch store that carry true parameters, compares the dataset builder's MR
binarisations (``ctsma.dataset.build.mr_reference_binary``: ``bvf`` — the default —, ``otsu-patch``,
``otsu-knee``) and a local adaptive threshold. Per parameter: Pearson r with the true value of the same
parameter, and R, the multiple correlation with all four true parameters (how much of the reference is
explained by the microstructure at all: the ceiling for a model that sees the microstructure only
through CT). The store's truth is measured on a central cube of the patch (``truth_extent_mm``); as a check of
that support, the truth is also re-measured on the whole patch (the MR reference's own support) from the
phantom's folders of the demo run, when they are there. Writes ``benchmarks/results/bench_mr_reference.json``.

    .venv/bin/python benchmarks/bench_mr_reference.py [demo_out/dataset/store]
"""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr
from skimage.filters import threshold_local
from sklearn.linear_model import LinearRegression

from ctsma.dataset.build import mr_reference_binary
from ctsma.dataset.store import PatchStore
from ctsma.morphometry import measure_batch

P = ["BV/TV", "Tb.Th", "Tb.Sp", "Tb.N"]
_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("store", nargs="?", default="demo_out/dataset/store", help="patch store of a demo run")
store = PatchStore(_ap.parse_args().store)
t = store.table
ok = np.flatnonzero(np.isfinite(t[[f"true_{p}" for p in P]].to_numpy()).all(1))
mr, masks = store.read("mr", ok)[:, 0], store.read("mr_mask", ok)[:, 0]
truth = t.iloc[ok][[f"true_{p}" for p in P]].to_numpy()
subjects = t["subject"].astype(str).to_numpy()[ok]
spacing = float(store.attrs["mr_spacing_mm"])


def score(bone, sp, m, truth=truth):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = measure_batch(bone, sp, masks=m)
    out = {}
    for i, p in enumerate(P):
        x = np.asarray(r[p], float)
        f = np.isfinite(x)
        reg = LinearRegression().fit(truth[f], x[f])
        out[p] = {"r": round(float(pearsonr(x[f], truth[f, i])[0]), 3),
                  "R": round(float(np.sqrt(max(reg.score(truth[f], x[f]), 0))), 3),
                  "mean": round(float(np.nanmean(x)), 3), "true_mean": round(float(truth[:, i].mean()), 3)}
    return out


results = {"n_patches": int(len(ok)), "n_knees": int(len(set(subjects)))}
for method in ("bvf", "otsu-patch"):
    bone, m, sp, _ = mr_reference_binary(mr, masks, method, spacing)
    results[method] = score(bone, sp, m)
# otsu-knee needs the knee's patches together
bones = np.zeros(mr.shape, bool)
for s in np.unique(subjects):
    i = np.flatnonzero(subjects == s)
    bones[i] = mr_reference_binary(mr[i], masks[i], "otsu-knee", spacing)[0]
results["otsu-knee"] = score(bones, (spacing,) * 3, masks)
results["local"] = score(np.stack([p < threshold_local(p, 15, offset=0) for p in mr]), (spacing,) * 3, masks)
for k in ("bvf", "otsu-patch", "otsu-knee", "local"):
    print(f"{k:11s} " + " | ".join(f"{p} r={v['r']:.2f} R={v['R']:.2f} mean={v['mean']:.2f}/{v['true_mean']:.2f}"
                                   for p, v in results[k].items()))


def truth_on_patch_support(demo: Path, spacing_mm: float = 0.0625):
    """The truth re-measured on the MR reference's own support: the whole patch cube (its ROI part, the MR mask
    upsampled), instead of the store's central ``truth_extent_mm`` cube. None without the phantom's folders."""
    import SimpleITK as sitk
    from ctsma.dataset.build import BuildSettings, true_patches
    extent = float(store.attrs.get("extent_mm", 8.0))
    s_ = BuildSettings(truth_extent_mm=extent, truth_spacing_mm=spacing_mm)
    rows = []
    for j, i in enumerate(ok):
        r = t.iloc[i]
        subject = str(r["subject"])
        knee, reg = demo / "phantom" / subject, demo / "registration" / "cohort" / subject / "transform_ct_to_mr.h5"
        if not (knee / "metadata.json").is_file() or not reg.is_file():
            return None
        centre = np.array([[-r["centre_x"], -r["centre_y"], r["centre_z"]]])  # RAS -> LPS
        tb = true_patches(knee, sitk.ReadTransform(str(reg)), centre, s_)
        if tb is None:  # the phantom cannot regenerate this knee
            return None
        tb = tb[0]
        k = tb.shape[0] // masks.shape[1]
        if k * masks.shape[1] != tb.shape[0]:
            raise SystemExit(f"truth grid {tb.shape[0]} is not a multiple of the MR patch grid {masks.shape[1]}")
        m = np.kron(masks[j] > 0, np.ones((k, k, k), bool))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = measure_batch(tb[None], (extent / tb.shape[0],) * 3, masks=m[None])
        rows.append([res[p][0] for p in P])
    return np.array(rows)


whole = truth_on_patch_support(store.dir.resolve().parent.parent)  # the demo run's folder
if whole is not None:
    bone, m, sp, _ = mr_reference_binary(mr, masks, "bvf", spacing)
    results["bvf_vs_truth_on_whole_patch"] = score(bone, sp, m, truth=whole)
    results["bvf_vs_truth_on_whole_patch"]["r_centre_vs_whole_truth"] = {
        p: round(float(pearsonr(truth[:, i], whole[:, i])[0]), 3) for i, p in enumerate(P)}
    print("bvf vs the truth on the whole patch: " + " | ".join(
        f"{p} r={v['r']:.2f} R={v['R']:.2f}" for p, v in results["bvf_vs_truth_on_whole_patch"].items() if p in P))
out = Path(__file__).parent / "results" / "bench_mr_reference.json"
out.write_text(json.dumps(results, indent=1))
print("written", out)
