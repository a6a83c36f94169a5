"""Demo training time and accuracy: .venv/bin/python benchmarks/bench_training.py [--store DIR] [--config FILE]

Trains the teacher, the distilled student and the baseline student with the demo config (default
Resources/Configs/demo.yaml; the split is the store's own, else patient-level from the config), times each,
then runs `evaluate` on the held-out patients. Without --store a synthetic store (ctsma.dataset.synthetic,
20 subjects x 64 patches) is made under --work. Targets (demo phantom, CPU): the three trainings in <= 10 min
(aim ~5), distilled mean ICC(2,1) >= 0.85 (each >= 0.80), gain over baseline >= 0.05 with CI excluding 0.
Prints a table and writes benchmarks/results/bench_training[_<tag>].json.
"""

import argparse
import json
import os
import time
from pathlib import Path

from ctsma import PARAMETERS
from ctsma.dataset import PatchStore
from ctsma.dataset.synthetic import make_synthetic_store
from ctsma.evaluation.regression import evaluate
from ctsma.models import load_train_config, train
from ctsma.resources import resource_path

ap = argparse.ArgumentParser()
ap.add_argument("--store", default=None)
ap.add_argument("--config", default=str(resource_path("Configs", "demo.yaml")))
ap.add_argument("--work", default="/tmp/ctsma_bench_training")
ap.add_argument("--tag", default="", help="suffix of the result file")
ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides, as for ctsma train")
ap.add_argument("--hard", action="store_true",
                help="harder synthetic store: 12 subjects x 48 patches, CT noise 150 HU, PSF sd 0.7 mm")
ap.add_argument("--skip-teacher", action="store_true", help="reuse the teacher already in --work")
a = ap.parse_args()

work = Path(a.work)
if a.store:
    store = PatchStore(a.store)
else:
    d = work / ("synthetic_store_hard" if a.hard else "synthetic_store")
    kw = dict(n_subjects=12, patches_per_subject=48, ct_noise_hu=150.0, psf_mm=0.7) if a.hard else \
        dict(n_subjects=20, patches_per_subject=64)
    store = PatchStore(d) if (d / "patches.h5").is_file() else make_synthetic_store(d, **kw)
from ctsma.cli.train import overrides_from  # noqa: E402
import types  # noqa: E402
over = overrides_from(types.SimpleNamespace(set=a.set, store=str(store.dir),
                                            out=str(work / ("run_" + a.tag if a.tag else "run"))))
over.setdefault("trainer", {})["progress_bar"] = False
cfg = load_train_config(a.config, over)
load0 = os.getloadavg()[0]
res = {"store": str(store.dir), "n_patches": len(store), "config": a.config, "overrides": a.set,
       "threads": os.environ.get("OMP_NUM_THREADS"), "load_average_1min_start": load0, "seconds": {}}
for which in ("teacher", "student", "baseline"):
    if which == "teacher" and a.skip_teacher:
        continue
    t = time.perf_counter()
    train(which, cfg, store=store)
    res["seconds"][which] = round(time.perf_counter() - t, 1)
res["seconds"]["total_training"] = round(sum(res["seconds"].values()), 1)
t = time.perf_counter()
m = evaluate(cfg, work / ("eval_" + a.tag if a.tag else "eval"), store=store, ablations=False)
res["seconds"]["evaluate"] = round(time.perf_counter() - t, 1)
res["load_average_1min_end"] = os.getloadavg()[0]
res["regression"] = {s: {"mean_icc21": b["mean_icc21"], **{p: b[p]["icc21"] for p in PARAMETERS}}
                     for s, b in m["regression"].items()}
if "regression_vs_truth" in m:
    res["regression_vs_truth"] = {s: {"mean_icc21": b["mean_icc21"], **{p: b[p]["icc21"] for p in PARAMETERS}}
                                  for s, b in m["regression_vs_truth"].items()}
res["distillation_gain"] = m.get("distillation_gain")
res["n_test_patients"] = m["regression_info"]["n_patients"]
res["n_test_patches"] = m["regression_info"]["n_patches"]

print(f"store {store.dir} ({len(store)} patches); load average {load0:.1f} -> {res['load_average_1min_end']:.1f}")
print("seconds: " + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()))
print(f"{'source':<18} {'mean ICC21':>10} " + " ".join(f"{p:>7}" for p in PARAMETERS))
for s, b in res["regression"].items():
    f = lambda v: f"{v:7.3f}" if v is not None else "    n/a"  # noqa: E731
    print(f"{s:<18} {f(b['mean_icc21']):>10} " + " ".join(f(b[p]) for p in PARAMETERS))
g = res["distillation_gain"]
if g:
    print(f"distillation gain {g['mean_icc21_diff']:+.3f} CI [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]")
out = Path(__file__).parent / "results" / f"bench_training{'_' + a.tag if a.tag else ''}.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(res, indent=2) + "\n")
print(f"wrote {out}")
