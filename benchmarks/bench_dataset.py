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
import shutil  # noqa: E402
import warnings  # noqa: E402

from ctsma import progress  # noqa: E402

progress.configure(quiet=True)
shutil.rmtree(work / "ds", ignore_errors=True)      # time a full build, not a resume
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    summary = build_dataset(cohort / "manifest.csv", work / "ds", BuildSettings(transform_column="transform_ct_to_mr"))
res["build_s"] = time.time() - t
res["n_patches"] = summary["n_patches"]
res["n_subjects"] = summary["n_subjects"]
res["true_source"] = sorted({v.get("true_source", "") for v in summary["attrs"].get("subject_info", {}).values()})
res["load_average_1min"] = __import__("os").getloadavg()[0]
try:
    from ctsma.dataset import PatchStore
    from ctsma.dataset.loader import PatchDataset, make_loader

    store = PatchStore(work / "ds")
    split = store.patient_split()
    ds = PatchDataset(store, split.train, augment=True)
    loader = make_loader(ds, 64, shuffle=True)
    for _ in loader:          # warm-up: loads the arrays into RAM
        break
    t = time.time()
    n = 0
    while time.time() - t < 5:
        for batch in loader:
            n += len(batch["index"])
    res["loader_pairs_per_s"] = n / (time.time() - t)
    res["loader"] = "ctsma.dataset.loader.make_loader(PatchDataset(train, augment=True), 64), 0 workers"
except Exception as exc:  # the loader is another engineer's; report rather than fail
    res["loader_error"] = f"{type(exc).__name__}: {exc}"
for k, v in res.items():
    print(f"{k:20s} {v}")
out = Path(__file__).parent / "results"
out.mkdir(exist_ok=True)
(out / "bench_dataset.json").write_text(json.dumps(res, indent=2))
