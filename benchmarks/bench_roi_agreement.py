"""Do the CT-only maps agree with the MR at ROI level?  (issue 8: ROI means from the maps vs MR ROI means)

For every knee of a finished demo run, ``ctsma.inference.infer`` runs on the CT alone with the distilled student
of the cross-fitting fold that held that knee out (so every map is out-of-sample), and the ROI means of its maps
are compared with the MR-derived ROI means (the mean MR reference of the knee's patches in that ROI) and with the
phantom's true per-ROI values. ICC(2,1) and Pearson r over (knee, ROI) pairs, per parameter (against the truth
only r is meaningful: MR-derived values are apparent, on another scale). For comparison the same ROI
means are formed from the out-of-fold patch predictions of the demo's evaluation (no maps): the difference
between the two rows is what the sliding-window maps themselves add or lose.

    .venv/bin/python benchmarks/bench_roi_agreement.py [DEMO_DIR] [--tag NAME]   # default demo_out (`make demo`)
    .venv/bin/python benchmarks/bench_roi_agreement.py --mr-store STORE --tag all_positions
    .venv/bin/python benchmarks/bench_roi_agreement.py DEMO_DIR --stride 2 --tta --tag stride2_tta

Writes ``benchmarks/results/bench_roi_agreement[_<tag>].json``. DEMO_DIR is a finished demo's output folder (its
``phantom``, ``dataset/store``, ``training/fold*`` and ``evaluation``); ``--seed`` and ``--folds`` must be the
demo's (0 and 3 by default). A knee whose fold model was trained on it is refused.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ctsma import PARAMETERS, ROIS
from ctsma.dataset.store import PatchStore
from ctsma.demo.settings import DemoSettings
from ctsma.demo.stages import Context, fold_config
from ctsma.errors import UserError
from ctsma.evaluation.regression import check_held_out
from ctsma.inference.engine import InferSettings, infer
from ctsma.modelfile import read_metadata
from ctsma.stats import icc21, pearson_r

ROOT = Path(__file__).resolve().parents[1]


def icc_table(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    m = a.merge(b, on=["subject", "roi", "parameter"], suffixes=("_a", "_b"))
    out = {}
    for p in PARAMETERS:
        s = m[m.parameter == p].dropna()
        a, b = s["value_a"].to_numpy(), s["value_b"].to_numpy()
        r = icc21(a, b)
        out[p] = {"icc21": round(float(r.value), 3), "ci": [round(float(c), 3) for c in r.ci],
                  "pearson_r": round(float(pearson_r(a, b)), 3), "n": int(len(s))}
    out["mean_icc21"] = round(float(np.mean([out[p]["icc21"] for p in PARAMETERS])), 3)
    return out


def mr_roi_means(table: pd.DataFrame) -> pd.DataFrame:
    """The mean MR reference of each (knee, ROI)'s patches in a patch store's table, long format."""
    return (table.assign(subject=table["subject"].astype(str))
            .melt(id_vars=["subject", "roi"], value_vars=[f"mr_{p}" for p in PARAMETERS], var_name="parameter")
            .assign(parameter=lambda d: d.parameter.str[3:]).groupby(["subject", "roi", "parameter"], as_index=False)
            .value.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("demo", nargs="?", default=str(ROOT / "demo_out"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--seed", type=int, default=0, help="the demo's seed (its patient split)")
    ap.add_argument("--folds", type=int, default=3, help="the demo's cross-fitting folds")
    ap.add_argument("--stride", type=float, default=None, help="infer's --stride (mm; default: infer's)")
    ap.add_argument("--tta", action="store_true", help="infer's --tta (8 flips instead of 4)")
    ap.add_argument("--mr-store", help="a patch store of the same cohort without the per-ROI cap (`ctsma dataset "
                    "build --rois auto --max-per-roi 1000 --no-truth`, the demo's registrations): MR ROI means over "
                    "every patch position of each ROI, the ROI the maps cover, as a second reference")
    a = ap.parse_args()
    demo = Path(a.demo).resolve()
    ctx = Context(demo, DemoSettings(seed=a.seed, folds=a.folds))
    store = PatchStore(demo / "dataset" / "store")
    t = store.table.copy()
    t["subject"] = t["subject"].astype(str)
    cohort = ctx.cohort().set_index("subject")
    # MR-derived ROI means (the store's patches of the knee's ROI: at most 16, a random subset) and the true values
    mr = mr_roi_means(t)
    truth = pd.DataFrame([{"subject": s, "roi": r, "parameter": p, "value": cohort.loc[s, f"true_{r}_{p}"]}
                          for s in cohort.index for r in ROIS for p in PARAMETERS
                          if f"true_{r}_{p}" in cohort.columns])
    extra = {"tta": True} if a.tta else {}
    if a.stride:
        extra["stride_mm"] = a.stride

    def settings(side: str) -> InferSettings:
        return InferSettings(side=side, **extra)

    rows, secs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for f in range(ctx.s.folds):
            c = fold_config(ctx, f).data
            split = store.patient_split(c.test_fraction, c.val_fraction, k=c.k_folds, fold=f, seed=c.split_seed,
                                        use_stored=False)
            model = demo / "training" / f"fold{f}" / "student_distilled.safetensors"
            try:
                check_held_out(model, read_metadata(model), split.subjects["test"])
            except UserError as e:
                raise SystemExit(f"{e} (fold {f}: give the demo's --seed and --folds)") from None
            for s in sorted(split.subjects["test"]):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    infer(ctx.manifest.parent / cohort.loc[s, "ct"], Path(tmp) / s, model_path=model,
                          settings=settings(str(cohort.loc[s, "side"])), diagnosis_path=None, subject=s)
                secs.append(time.perf_counter() - t0)
                tab = pd.read_csv(Path(tmp) / s / "roi_table.csv")
                rows += [{"subject": s, "roi": r.roi, "parameter": r.parameter, "value": r.mean}
                         for r in tab.itertuples()]
                print(f"fold {f}: {s} done in {secs[-1]:.1f} s", flush=True)
    maps = pd.DataFrame(rows)
    # the same ROI means from the evaluation's out-of-fold patch predictions
    pred = pd.read_csv(demo / "evaluation" / "regression_predictions.csv", dtype={"subject": str})
    idx = np.load(demo / "evaluation" / "oof_index.npy")
    base = t.iloc[idx][["subject", "roi"]].reset_index(drop=True)
    patch = pd.concat([base.assign(parameter=p, value=pred[f"student_distilled_{p}"].to_numpy()) for p in PARAMETERS])
    patch = patch.groupby(["subject", "roi", "parameter"], as_index=False).value.mean()
    res = {"demo": str(demo), "infer_settings": {k: v for k, v in vars(settings("L")).items() if k != "side"},
           "n_knees": int(maps.subject.nunique()), "seconds_per_knee": round(float(np.mean(secs)), 1),
           "maps_vs_mr": icc_table(maps, mr), "patch_oof_vs_mr": icc_table(patch, mr),
           "maps_vs_truth": icc_table(maps, truth), "mr_vs_truth": icc_table(mr, truth)}
    if a.mr_store:
        full_table = PatchStore(a.mr_store).table
        full = mr_roi_means(full_table)
        res.update(mr_store=str(a.mr_store), patches_per_roi_all_positions=round(float(
                   full_table.groupby(["subject", "roi"]).size().mean()), 1),
                   patches_per_roi_store=round(float(t.groupby(["subject", "roi"]).size().mean()), 1),
                   maps_vs_mr_all_positions=icc_table(maps, full), patch_oof_vs_mr_all_positions=icc_table(patch, full),
                   mr_all_positions_vs_truth=icc_table(full, truth), mr_store_vs_mr_all_positions=icc_table(mr, full))
    out = ROOT / "benchmarks" / "results" / f"bench_roi_agreement{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(res, indent=1))
    for k in [k for k in res if isinstance(res[k], dict) and "mean_icc21" in res[k]]:
        print(f"{k:16s} ICC(2,1) mean {res[k]['mean_icc21']:.3f}  " +
              "  ".join(f"{p} {res[k][p]['icc21']:.3f} (r {res[k][p]['pearson_r']:.2f})" for p in PARAMETERS))
    print("written", out)


if __name__ == "__main__":
    main()
