"""Time the patch-dataset build on a phantom cohort: .venv/bin/python benchmarks/bench_dataset.py [--n 24]

Generates the cohort with `ctsma phantom` (if not already in --work), builds the dataset with the true
transforms (`--transform-column transform_ct_to_mr`), then times the store's loader. Prints a table and writes
benchmarks/results/bench_dataset.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=24)
ap.add_argument("--work", default="/tmp/ctsma_bench_dataset")
a = ap.parse_args()
work = Path(a.work)
cohort = work / "cohort"
res = {}
if not (cohort / "manifest.csv").is_file():
    t = time.time()
    subprocess.run([sys.executable, "-m", "ctsma.cli.main", "--quiet", "phantom", "--n", str(a.n), "--seed", "0",
                    "--out", str(cohort), "--preset", "demo"], check=True)
    res["phantom_s"] = time.time() - t
from ctsma.dataset.build import BuildSettings, build_dataset  # noqa: E402

t = time.time()
summary = build_dataset(cohort / "manifest.csv", work / "ds", BuildSettings(transform_column="transform_ct_to_mr"))
res["build_s"] = time.time() - t
res["n_patches"] = summary["n_patches"]
try:
    import numpy as np
    from ctsma.dataset import PatchStore
    store = PatchStore(work / "ds")
    arr = store.arrays()
    t = time.time()
    n = 0
    rng = np.random.default_rng(0)
    while time.time() - t < 3:
        idx = np.sort(rng.choice(len(store), min(64, len(store)), replace=False))
        _ = arr["ct"][idx], arr["mr"][idx]
        n += len(idx)
    res["raw_pairs_per_s"] = n / (time.time() - t)
except Exception as exc:  # loader owned elsewhere
    res["loader_error"] = str(exc)
for k, v in res.items():
    print(f"{k:20s} {v}")
out = Path(__file__).parent / "results"
out.mkdir(exist_ok=True)
(out / "bench_dataset.json").write_text(json.dumps(res, indent=2))
