"""Probe: variance-matching calibration (ctsma.models.calibration.fit) fitted on each fold's validation patients,
applied to its test patients; writes calibrated copies of the fold models into OUT_CAL/training/foldF."""
import sys, json, os
from pathlib import Path
import numpy as np
from ctsma import PARAMETERS, stats
from ctsma.dataset.store import PatchStore
from ctsma.models.export import load_parameter_model, FLIPS_DEFAULT, META_VERSION
from ctsma.models import calibration as calib
from ctsma.models.train import run_paths
from ctsma.modelfile import load_model, save_model
from ctsma.demo.stages import fold_config
from ctsma.demo.settings import DemoSettings

class Ctx: pass
out = Path(sys.argv[1]); seed = int(sys.argv[2]); cal_out = Path(sys.argv[3]); folds = 3
ctx = Ctx(); ctx.out = out; ctx.s = DemoSettings(seed=seed)
store = PatchStore(out / "dataset" / "store")
ref_all = store.targets("mr")
subj_all = store.table["subject"].astype(str).to_numpy()
for d in ("phantom", "dataset", "evaluation"):
    (cal_out).mkdir(parents=True, exist_ok=True)
    if not (cal_out / d).exists():
        os.symlink(out / d, cal_out / d)
res = {}
for role in ("teacher", "student_distilled", "student_baseline"):
    raw, cal, refs, subs = [], [], [], []
    for f in range(folds):
        cfg = fold_config(ctx, f); c = cfg.data
        split = store.patient_split(c.test_fraction, c.val_fraction, k=c.k_folds, fold=f, seed=c.split_seed, use_stored=False)
        path = run_paths(cfg, role)[1]
        model, meta = load_parameter_model(path)
        mod = meta["input"]["modality"]
        pv = model.predict_flips(store.read(mod, split.val), None, FLIPS_DEFAULT)[0]
        pt = model.predict_flips(store.read(mod, split.test), None, FLIPS_DEFAULT)[0]
        rec = calib.fit(pv, ref_all[split.val], subj_all[split.val]); rec["flips"] = 4
        raw.append(pt); cal.append(calib.apply(pt, rec)); refs.append(ref_all[split.test])
        print(role, f, "slope", np.round(rec["slope"], 3), "val r", np.round(rec["validation_r"], 3), flush=True)
        tensors, m = load_model(path); m.pop("_sha256"); m["meta_version"] = META_VERSION; m["calibration"] = rec
        dst = cal_out / "training" / f"fold{f}" / path.name; dst.parent.mkdir(parents=True, exist_ok=True)
        save_model(dst, tensors, m, kind=m["kind"])
    raw, cal, ref = np.concatenate(raw), np.concatenate(cal), np.concatenate(refs)
    row = {}
    for name, p in (("raw", raw), ("cal", cal)):
        row[name] = {q: {"icc21": stats.icc21(ref[:, j], p[:, j]).value, "r": float(np.corrcoef(ref[:, j], p[:, j])[0, 1]),
                         "mae": float(np.mean(np.abs(ref[:, j] - p[:, j])))} for j, q in enumerate(PARAMETERS)}
        row[name]["mean_icc21"] = float(np.mean([row[name][q]["icc21"] for q in PARAMETERS]))
    res[role] = row
    for k, v in row.items():
        print(role, k, round(v["mean_icc21"], 4), "icc", [round(v[q]["icc21"], 3) for q in PARAMETERS], "r", [round(v[q]["r"], 3) for q in PARAMETERS], "mae", [round(v[q]["mae"], 4) for q in PARAMETERS], flush=True)
json.dump(res, open(cal_out / "calib_probe.json", "w"), indent=1)
