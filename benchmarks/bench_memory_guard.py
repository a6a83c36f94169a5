"""Peak memory per input voxel of ``ctsma morphometry`` (calibrates ctsma.io.memory.BYTES_PER_VOXEL).

Each size runs in a fresh process: peak RSS (ru_maxrss) after the whole command minus the RSS after the
imports, divided by the voxel count. Prints a table and writes benchmarks/results/bench_memory_guard.json.

    .venv/bin/python benchmarks/bench_memory_guard.py [--sizes 96 128 160]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, json, numpy as np, SimpleITK as sitk
from ctsma.cli.main import main
import ctsma.morphometry, ctsma.io  # imports before the baseline
n, d = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
from scipy import ndimage
field = ndimage.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 2.0)
img = sitk.GetImageFromArray((field > 0.05).astype(np.uint8)); img.SetSpacing((0.05,) * 3)
sitk.WriteImage(img, d + "/bin.nii.gz")
del field, img
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
main(["--quiet", "morphometry", d + "/bin.nii.gz", "--out", d + "/out", "--maps", "--threads", "1"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"n": n, "voxels": n ** 3, "base_bytes": base, "peak_bytes": peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160])
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), d], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["bytes_per_voxel"] = (r["peak_bytes"] - r["base_bytes"]) / r["voxels"]
        rows.append(r)
        print(f"{n:>4}^3  {r['voxels']:>10,} voxels  peak growth {(r['peak_bytes'] - r['base_bytes']) / 1e6:8.1f} MB"
              f"  {r['bytes_per_voxel']:6.1f} B/voxel", flush=True)
    from ctsma.io.memory import BYTES_PER_VOXEL

    res = {"stage": "morphometry (--maps, 1 thread)", "rows": rows,
           "max_bytes_per_voxel": max(r["bytes_per_voxel"] for r in rows),
           "configured_bytes_per_voxel": BYTES_PER_VOXEL["morphometry"]}
    out = Path(__file__).parent / "results" / "bench_memory_guard.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"max {res['max_bytes_per_voxel']:.1f} B/voxel measured; configured {res['configured_bytes_per_voxel']}"
          f" -> {out}")


if __name__ == "__main__":
    main()
