"""Patch-pair loading speed: .venv/bin/python benchmarks/bench_loader.py [--store DIR] [--n-subjects 16]

Measures CT+MR patch pairs per second delivered by the training loader (ctsma.dataset.loader: whole-batch reads,
store cached in RAM; and the same with the RAM cache off, i.e. sorted HDF5 reads), with and without augmentation.
Target: >= 500 pairs/s on a 2-core machine. Prints a table and writes benchmarks/results/bench_loader.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ctsma.dataset import PatchStore
from ctsma.dataset.loader import PatchDataset, make_loader
from ctsma.dataset.synthetic import make_synthetic_store

ap = argparse.ArgumentParser()
ap.add_argument("--store", default=None, help="patch store (default: a synthetic one under --work)")
ap.add_argument("--work", default="/tmp/ctsma_bench_loader")
ap.add_argument("--n-subjects", type=int, default=16)
ap.add_argument("--epochs", type=int, default=3)
a = ap.parse_args()

if a.store:
    store = PatchStore(a.store)
else:
    d = Path(a.work) / "store"
    store = PatchStore(d) if (d / "patches.h5").is_file() else make_synthetic_store(d, a.n_subjects, 48)
idx = np.arange(len(store))
rows = []
for ram, augment in ((True, False), (True, True), (False, False), (False, True)):
    s = PatchStore(store.dir)
    t0 = time.perf_counter()
    ds = PatchDataset(s, idx, augment=augment, ram_budget_bytes=4e9 if ram else 0)
    setup = time.perf_counter() - t0
    loader = make_loader(ds, 32, shuffle=True, seed=0)
    n = 0
    t0 = time.perf_counter()
    for ep in range(a.epochs):
        loader.sampler.set_epoch(ep)
        for b in loader:
            n += b["ct"].shape[0]
    dt = time.perf_counter() - t0
    rows.append({"ram_cache": ram, "augment": augment, "pairs": n, "seconds": round(dt, 3),
                 "pairs_per_s": round(n / dt, 1), "cache_load_s": round(setup, 3)})
load = os.getloadavg()[0]
print(f"store {store.dir}: {len(store)} patches, CT {store.ct_shape}, MR {store.mr_shape}; load average {load:.1f}")
print(f"{'RAM cache':>9} {'augment':>8} {'pairs/s':>9} {'cache load s':>13}")
for r in rows:
    print(f"{str(r['ram_cache']):>9} {str(r['augment']):>8} {r['pairs_per_s']:>9.0f} {r['cache_load_s']:>13.2f}")
out = Path(__file__).parent / "results" / "bench_loader.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"store": str(store.dir), "n_patches": len(store), "load_average_1min": load,
                           "cpu_count": os.cpu_count(), "target_pairs_per_s": 500, "results": rows}, indent=2) + "\n")
print(f"wrote {out}")
