"""The demo's cross-fitted training and evaluation on an existing patch store, with any training config.

    .venv/bin/python benchmarks/bench_crossfit.py --store demo_out/dataset/store [--config FILE]
                     [--set KEY=VALUE ...] [--folds 3] [--seed 0] [--work DIR] [--tag NAME]
                     [--labels demo_out/phantom/manifest.csv] [--train-seed N] [--eval-store STORE]

Runs exactly what the demo's training and evaluation stages run (``ctsma.demo.stages``: K-fold patient-level
cross-fitting of teacher, distilled and baseline students, pooled out-of-fold ICC against the MR reference and
the truth, and the paired bootstrap of the distillation gain), but with the config given (default: the demo's),
so a larger configuration or a GPU can be compared with the demo's on the same patches. ``--train-seed N`` trains
with another seed (network initialisation, batches, augmentation) on the same folds, which ``--seed`` sets: several
such runs measure the spread that training alone gives, or an ensemble of their out-of-fold predictions
(``benchmarks/bench_ensemble.py``). With ``--labels`` (a
cohort manifest with ``subject, oa, kl_grade, severity``) it also runs the demo's diagnosis stage on the
out-of-fold predictions (the three aggregators, AUCs and the DeLong p of distilled vs baseline). Prints a table and
writes ``benchmarks/results/bench_crossfit[_<tag>].json`` with per-stage times and the device used.

``--eval-store STORE`` also scores the trained models on another store of the same knees (e.g. the demo's store,
when the models were trained on a denser one built with ``ctsma dataset build --stride-mm 2 --max-per-roi 64``): the
same folds, each knee predicted by the models that held it out (``predict_sources`` refuses any other), the patch-level
ICC(2,1), the distillation gain and the ICC of the knee-ROI means of the patches. Two training stores are then
compared on the same held-out patches.

To move a store to a machine where the float32 store is too large to copy, ``--pack FILE`` writes it with the
MR patches quantised to 8 bits (step 1/170 of the knee-normalised intensity, up to 1.5: a rounding error of SD
0.0017) and the CT patches rounded to 1 HU (the demo store: 259 MiB → 47 MiB); ``--store FILE.h5`` then unpacks
such a file into ``--work`` before running. A ``--pack`` name ending in ``.xz`` compresses the packed file with
xz (byte-delta filter, no gzip inside) instead, for a transfer limit that gzip misses (the 36-knee demo store:
786 MiB → 71.6 MiB with gzip, about 52 MiB with xz; xz takes a minute or two on 2 cores). The demo config gave the same figures on both (mean ICC of the
distilled / baseline students 0.666 / 0.643 packed, 0.666 / 0.644 in the demo run that built the store). Compare
configs on the same (packed or not) patches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("--store", required=True, help="patch store folder, or a file written by --pack")
ap.add_argument("--config", default="demo", help="a shipped training config ('demo', 'gpu') or a YAML path")
ap.add_argument("--set", action="append", default=[], help="KEY.SUB=VALUE override of the config (YAML value)")
ap.add_argument("--folds", type=int, default=3)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--work", default="/tmp/ctsma_bench_crossfit")
ap.add_argument("--tag", default="")
ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
ap.add_argument("--pack", default=None, help="write the store, quantised, to this .h5 file and stop")
ap.add_argument("--labels", default=None, help="cohort manifest with OA labels: also run the diagnosis stage")
ap.add_argument("--eval-store", default=None, help="also score the models on this store's held-out patches")
ap.add_argument("--train-seed", type=int, default=None,
                help="training seed (default: --seed, as the demo); the folds stay those of --seed")
MR_STEP = 1 / 170.0


def pack(store_dir: Path, dest: Path) -> None:
    import h5py

    xz = dest.suffix == ".xz"
    h5 = dest.with_suffix("") if xz else dest
    gz = None if xz else "gzip"
    with h5py.File(store_dir / "patches.h5", "r") as f, h5py.File(h5, "w") as g:
        mr = f["mr"][:]
        if mr.min() < 0 or mr.max() > 255 * MR_STEP:
            sys.exit(f"MR intensities {mr.min():.3f}..{mr.max():.3f} do not fit 8 bits of step {MR_STEP}")
        g.create_dataset("mr_u8", data=np.rint(mr / MR_STEP).astype(np.uint8), compression=gz)
        g.create_dataset("ct_i16", data=np.rint(f["ct"][:]).astype(np.int16), compression=gz)
        for k in ("ct_mask", "mr_mask"):
            g.create_dataset(k, data=f[k][:], compression=gz)
        for k, v in f.attrs.items():
            g.attrs[k] = v
        g.attrs["_csv"] = (store_dir / "patches.csv").read_text()
        g.attrs["_summary"] = (store_dir / "summary.json").read_text()
        if a.labels:  # the few label columns the diagnosis stage reads
            import pandas as pd

            g.attrs["_labels"] = pd.read_csv(a.labels)[["subject", "oa", "kl_grade", "severity"]].to_csv(index=False)
    if xz:
        import lzma

        filters = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
        with open(h5, "rb") as i, lzma.open(dest, "wb", format=lzma.FORMAT_XZ, filters=filters) as o:
            shutil.copyfileobj(i, o, 1 << 24)
        h5.unlink()
    print(f"packed {store_dir} into {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")


def unpack(src: Path, store_dir: Path) -> None:
    import h5py

    store_dir.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".xz":
        import lzma

        plain = store_dir.parent / "packed.h5"
        with lzma.open(src, "rb") as i, open(plain, "wb") as o:
            shutil.copyfileobj(i, o, 1 << 24)
        src = plain
    with h5py.File(src, "r") as g, h5py.File(store_dir / "patches.h5", "w") as f:
        f.create_dataset("mr", data=g["mr_u8"][:].astype(np.float32) * np.float32(MR_STEP))
        f.create_dataset("ct", data=g["ct_i16"][:].astype(np.float32))
        for k in ("ct_mask", "mr_mask"):
            f.create_dataset(k, data=g[k][:])
        for k, v in g.attrs.items():
            if not k.startswith("_"):
                f.attrs[k] = v
        (store_dir / "patches.csv").write_text(g.attrs["_csv"])
        (store_dir / "summary.json").write_text(g.attrs["_summary"])
        if "_labels" in g.attrs:
            (store_dir / "labels.csv").write_text(g.attrs["_labels"])


def _r3(v):
    return None if v is None else round(float(v), 3)


def _nan(v):
    return float("nan") if v is None else v


def score_on_store(ctx, store_dir: Path) -> dict:
    """The cross-fitted models of ``ctx`` on another store's held-out patches: patch ICC(2,1), gain, ROI means."""
    import pandas as pd

    from ctsma import PARAMETERS
    from ctsma.dataset.store import PatchStore
    from ctsma.demo import stages
    from ctsma.evaluation.regression import agreement_block, distillation_gain
    from ctsma.stats import icc21

    store = PatchStore(store_dir)
    idx, preds = stages.oof_predictions(ctx, store)  # each knee by the fold models that held it out
    subjects = store.table["subject"].astype(str).to_numpy()[idx]
    ref = store.targets("mr")[idx]
    out = {"store": str(store_dir), "n_patches": int(len(idx)), "icc21": {}, "roi_means_icc21": {}}
    keys = store.table.iloc[idx][["subject", "roi"]].astype(str).reset_index(drop=True)
    for s, pred in preds.items():
        b = agreement_block(ref, pred, subjects)
        out["icc21"][s] = {**{p: _r3(b[p]["icc21"]) for p in PARAMETERS}, "mean": _r3(b["mean_icc21"])}
        m = pd.concat([keys, pd.DataFrame(pred, columns=PARAMETERS),
                       pd.DataFrame(ref, columns=[f"ref {p}" for p in PARAMETERS])], axis=1)
        m = m.groupby(["subject", "roi"]).mean()
        roi = {p: round(float(icc21(m[p].to_numpy(), m[f"ref {p}"].to_numpy()).value), 3) for p in PARAMETERS}
        out["roi_means_icc21"][s] = {**roi, "mean": round(float(np.mean(list(roi.values()))), 3)}
    g = distillation_gain(ref, preds["student_distilled"], preds["student_baseline"], subjects,
                          n_boot=stages.fold_config(ctx, 0).evaluate.n_boot, seed=ctx.s.seed)
    out["distillation_gain"] = {"mean_icc21_diff": g["mean_icc21_diff"], "ci": g["ci"]}
    print(f"on {store_dir} ({len(idx)} held-out patches): ICC(2,1) per patch / of knee-ROI means")
    for s in out["icc21"]:
        print(f"  {s:<20}" + "".join(f"{_nan(out['icc21'][s][p]):8.3f}" for p in (*PARAMETERS, "mean"))
              + "   ROI " + "".join(f"{out['roi_means_icc21'][s][p]:7.3f}" for p in (*PARAMETERS, "mean")))
    print(f"  distillation gain {g['mean_icc21_diff']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]")
    return out


def main() -> None:
    """The benchmark (under the __main__ guard: the demo's training stage spawns worker processes, and each
    imports this script)."""
    import torch

    from types import SimpleNamespace

    from ctsma import PARAMETERS
    from ctsma.cli.train import overrides_from
    from ctsma.config import to_dict
    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings
    from ctsma.errors import ConfigError
    from ctsma.models import load_train_config

    try:  # the config with its overrides, checked as `ctsma train --set` checks them (unknown keys refused)
        cfg_path = stages.train_config_path(DemoSettings(train_config=a.config))
        cfg = to_dict(load_train_config(cfg_path, overrides_from(SimpleNamespace(set=a.set))))
    except ConfigError as e:
        sys.exit(str(e))
    cfg.pop("base_dir")  # the work folder's copy resolves nothing relative: the demo sets every path
    src = Path(a.store)
    if not src.exists():
        sys.exit(f"no patch store at {src}")
    if a.labels and not Path(a.labels).is_file():
        sys.exit(f"no labels file at {a.labels}")
    if a.eval_store and not (Path(a.eval_store) / "patches.h5").is_file():
        sys.exit(f"no patch store at {a.eval_store}")
    work = Path(a.work)
    if work.exists():
        if any(work.iterdir()) and not (work / "config.yaml").is_file():
            sys.exit(f"--work {work} is not empty and is not a work folder of this benchmark: choose another")
        shutil.rmtree(work)
    (work / "dataset").mkdir(parents=True)
    if src.is_file():
        unpack(src, work / "dataset" / "store")
    else:
        (work / "dataset" / "store").symlink_to(src.resolve())
    labels = Path(a.labels) if a.labels else work / "dataset" / "store" / "labels.csv"
    if labels.is_file():  # the diagnosis stage reads the labels from the cohort manifest
        (work / "phantom").mkdir()
        shutil.copy(labels, work / "phantom" / "manifest.csv")

    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    ctx = stages.Context(work, DemoSettings(folds=a.folds, seed=a.seed, train_config=str(work / "config.yaml")))
    if a.train_seed is not None:  # the demo trains with its cohort seed; keep its folds, change only the training
        demo_fold_config = stages.fold_config

        def fold_config(c, fold):
            cfg_f = demo_fold_config(c, fold)
            cfg_f.trainer.seed = a.train_seed
            return cfg_f

        stages.fold_config = fold_config
    res = {"store": str(src), "config": str(cfg_path), "overrides": a.set, "folds": a.folds, "seed": a.seed,
           "train_seed": a.seed if a.train_seed is None else a.train_seed,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
           "config_used": cfg, "seconds": {}}
    plan = [("training", stages.training), ("evaluation", stages.evaluation)]
    if labels.is_file():
        plan.append(("diagnosis", stages.diagnosis))
    for name, fn in plan:
        t = time.perf_counter()
        (work / name).mkdir(exist_ok=True)
        out = fn(ctx, work / name)
        res["seconds"][name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {res['seconds'][name]} s", flush=True)
    metrics = json.loads((work / "evaluation" / "metrics.json").read_text())
    res["mean_icc21"] = {s: b.get("mean_icc21") for s, b in metrics["regression"].items()}
    res["icc21"] = {s: {p: b[p]["icc21"] for p in PARAMETERS} for s, b in metrics["regression"].items()}
    if "regression_vs_truth" in metrics:
        res["mean_icc21_vs_truth"] = {s: b.get("mean_icc21") for s, b in metrics["regression_vs_truth"].items()}
    res["distillation_gain"] = metrics["distillation_gain"]
    res["distillation_gain_vs_truth"] = metrics.get("distillation_gain_vs_truth")

    print(f"{'source':<20}" + "".join(f"{p:>8}" for p in PARAMETERS) + f"{'mean':>8}")
    for s, row in res["icc21"].items():
        print(f"{s:<20}" + "".join(f"{row[p]:8.3f}" for p in PARAMETERS) + f"{res['mean_icc21'][s]:8.3f}")
    g = res["distillation_gain"]
    print(f"distillation gain {g['mean_icc21_diff']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]")
    if labels.is_file():
        dx = json.loads((work / "diagnosis" / "diagnosis_metrics.json").read_text())
        res["diagnosis"] = {k: {m: v.get(m) for m in ("auc", "auc_ci", "f1", "severity_mae", "severity_r2",
                                                      "p_auc_vs_student_baseline") if m in v} for k, v in dx.items()}
        for k, v in res["diagnosis"].items():
            p = v.get("p_auc_vs_student_baseline")
            print(f"AUC {k:<30} {v['auc']:.3f}" + (f"  (vs baseline: DeLong p {p:.2f})" if p is not None else ""))
    if a.eval_store:
        res["eval_store"] = score_on_store(ctx, Path(a.eval_store))
    out = Path(a.results) / f"bench_crossfit{'_' + a.tag if a.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    a = ap.parse_args()
    if a.pack:
        if not (Path(a.store) / "patches.h5").is_file():
            sys.exit(f"no patch store at {a.store}")
        pack(Path(a.store), Path(a.pack))
        sys.exit(0)
    main()
