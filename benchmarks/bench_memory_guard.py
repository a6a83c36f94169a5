"""Peak memory of ``ctsma morphometry`` and ``ctsma infer``, whole-volume against z-slabs under a budget.

Each run is a fresh process. It imports everything and warms numba's caches on a tiny image, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), runs the real command line in process, and reports the peak RSS
growth over the RSS before the command (``VmHWM - VmRSS``). The whole-volume run has the default budget; the
z-slab run sets ``CTSMA_MEMORY_GB`` below the whole-volume estimate so the command chunks, and its outputs are
compared with the whole run's. Writes benchmarks/results/bench_memory_guard.json.

    .venv/bin/python benchmarks/bench_memory_guard.py [--n 256] [--budget-fraction 0.15] [--skip-infer]

Morphometry: a binary Gaussian-field volume of n^3 voxels at 0.06 x 0.05 x 0.05 mm (z, y, x) in an ellipsoidal
ROI, ``--maps --threads 1``. Inference: the clinical-size phantom CT of bench_inference.py (512 x 512 x 300,
generated once into .bench/), demo model, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
import numpy as np
from ctsma.cli.main import main

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

argv, warm = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if warm:
    main(["--quiet", *warm])  # imports, numba caches, skimage: not the command's memory
import SimpleITK, torch, ctsma.inference.engine, ctsma.morphometry.slabs  # noqa: E401,F401
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
t = time.perf_counter()
rc = main(["--quiet", *argv])
print(json.dumps({"rc": rc, "base_bytes": base, "peak_bytes": status("VmHWM"), "wall_s": time.perf_counter() - t}))
"""


def child(argv, warm=None, budget_gb=None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("CTSMA_MEMORY_GB", None)
    if budget_gb is not None:
        env["CTSMA_MEMORY_GB"] = f"{budget_gb:.6f}"
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(a) for a in argv]),
                          json.dumps([str(a) for a in warm] if warm else [])],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"command failed: {out.stderr[-2000:]}")
    r["growth_bytes"] = r["peak_bytes"] - r["base_bytes"]
    return r


def _volume(d: Path, n: int) -> tuple[Path, Path]:
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    rng = np.random.default_rng(0)
    bone = ndimage.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 2.0) > 0.05
    z, y, x = np.ogrid[:n, :n, :n]
    c = (n - 1) / 2
    roi = ((z - c) / (0.5 * n)) ** 2 + ((y - c) / (0.45 * n)) ** 2 + ((x - c) / (0.45 * n)) ** 2 < 1
    paths = []
    for name, a in (("bone", bone), ("roi", roi)):
        im = sitk.GetImageFromArray(a.astype(np.uint8))
        im.SetSpacing((0.05, 0.05, 0.06))
        sitk.WriteImage(im, str(d / f"{name}.nii.gz"))
        paths.append(d / f"{name}.nii.gz")
    small = sitk.RegionOfInterest(sitk.ReadImage(str(paths[0])), [24, 24, 24], [0, 0, 0])
    sitk.WriteImage(small, str(d / "warm.nii.gz"))
    return paths[0], paths[1]


def _same_images(a: Path, b: Path, names) -> bool:
    import numpy as np
    import SimpleITK as sitk
    for name in names:
        x, y = sitk.ReadImage(str(a / name)), sitk.ReadImage(str(b / name))
        if (x.GetSize(), x.GetSpacing(), x.GetOrigin(), x.GetDirection()) != \
                (y.GetSize(), y.GetSpacing(), y.GetOrigin(), y.GetDirection()):
            return False
        if not np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y)):
            return False
    return True


def morphometry(n: int, fraction: float) -> dict:
    from ctsma.io.memory import estimate_bytes

    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        d = Path(tmp)
        bone, roi = _volume(d, n)
        warm = ["morphometry", d / "warm.nii.gz", "--out", d / "warm", "--maps", "--threads", "1"]
        argv = ["morphometry", bone, "--mask", roi, "--maps", "--threads", "1", "--out"]
        voxels = n ** 3
        need = estimate_bytes(voxels, "morphometry")
        budget = fraction * need
        print(f"morphometry {n}^3: whole ...", flush=True)
        whole = child([*argv, d / "whole"], warm)
        print(f"morphometry {n}^3: z-slabs under {budget / 1e6:.0f} MB ...", flush=True)
        slabs = child([*argv, d / "slabs"], warm, budget / 1e9)
        jw = json.loads((d / "whole" / "morphometry.json").read_text())
        js = json.loads((d / "slabs" / "morphometry.json").read_text())
        exact = all(jw[k] == js[k] for k in ("BV/TV", "Tb.Th", "Tb.Sp", "Conn.D", "histograms"))
        rel = {k: abs(js[k] - jw[k]) / abs(jw[k]) for k in ("Tb.Th.sd", "Tb.Sp.sd", "BS/BV")}
        maps_equal = _same_images(d / "whole", d / "slabs", ["tbth_map.nii.gz", "tbsp_map.nii.gz"])
    return {"command": "ctsma morphometry IMAGE --mask ROI --maps --threads 1",
            "image": f"binary Gaussian field {n}^3 at 0.06 x 0.05 x 0.05 mm, ellipsoidal ROI",
            "voxels": voxels, "estimate_bytes": need, "budget_bytes": budget,
            "whole": {**whole, "bytes_per_voxel": whole["growth_bytes"] / voxels},
            "slabs": {**slabs, "bytes_per_voxel": slabs["growth_bytes"] / voxels, "plan": js.get("slabs")},
            "peak_ratio": slabs["growth_bytes"] / whole["growth_bytes"],
            "slab_peak_within_budget": slabs["growth_bytes"] <= budget,
            "maps_equal": maps_equal, "exact_parameters_equal": exact, "sd_bsbv_max_rel_diff": max(rel.values())}


def infer(budget_per_voxel: float) -> dict:
    """Automatic bones and ROIs, and the user's labels (--segmentation, --rois: no ROI placement)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import SimpleITK as sitk
    from bench_inference import CACHE, knee

    from ctsma.io.memory import estimate_bytes

    k = knee()
    r = sitk.ImageFileReader()
    r.SetFileName(str(k["ct"]))
    r.ReadImageInformation()
    voxels = int(r.GetSize()[0] * r.GetSize()[1] * r.GetSize()[2])
    need = estimate_bytes(voxels, "infer")
    budget = budget_per_voxel * voxels
    labels = [p for p in (CACHE / "P0000" / "ct_bones.nii.gz", CACHE / "P0000" / "ct_rois.nii.gz")]
    res = {"command": "ctsma infer CT --side S --device cpu (demo model)", "ct_size": list(r.GetSize()),
           "voxels": voxels, "estimate_bytes": need, "budget_bytes": budget}
    for case, extra in (("automatic", []), ("user_labels", ["--segmentation", labels[0], "--rois", labels[1]])):
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            d = Path(tmp)
            argv = ["infer", k["ct"], "--side", k["side"], "--device", "cpu", *extra, "--out"]
            print(f"infer ({case}): whole ...", flush=True)
            whole = child([*argv, d / "whole"])
            print(f"infer ({case}): z-slabs under {budget / 1e9:.2f} GB ...", flush=True)
            slabs = child([*argv, d / "slabs"], budget_gb=budget / 1e9)
            plan = json.loads((d / "slabs" / "summary.json").read_text()).get("slab_planes")
            equal = _same_images(d / "whole", d / "slabs", ["maps/bvtv.nii.gz", "uncertainty/tbth.nii.gz"])
        res[case] = {"whole": {**whole, "bytes_per_voxel": whole["growth_bytes"] / voxels},
                     "slabs": {**slabs, "bytes_per_voxel": slabs["growth_bytes"] / voxels, "slab_planes": plan},
                     "peak_ratio": slabs["growth_bytes"] / whole["growth_bytes"],
                     "slab_peak_within_budget": slabs["growth_bytes"] <= budget, "maps_equal": equal}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="morphometry volume edge (voxels)")
    ap.add_argument("--budget-fraction", type=float, default=0.15,
                    help="morphometry budget as a fraction of the whole-volume estimate")
    ap.add_argument("--infer-budget", type=float, default=20.0, help="inference budget in bytes per CT voxel")
    ap.add_argument("--skip-infer", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0]},
           "morphometry": morphometry(args.n, args.budget_fraction)}
    if not args.skip_infer:
        res["infer"] = infer(args.infer_budget)
    res["seconds"] = time.perf_counter() - t0
    from ctsma.io import memory
    res["factors"] = {"whole": memory.BYTES_PER_VOXEL, "prepare": memory.PREPARE_BYTES_PER_VOXEL,
                      "resident": memory.RESIDENT_BYTES_PER_VOXEL, "slab": memory.SLAB_BYTES_PER_VOXEL}
    rows = [("morphometry", res["morphometry"], res["morphometry"])]
    if "infer" in res:
        rows += [(f"infer {case}", res["infer"], res["infer"][case]) for case in ("automatic", "user_labels")]
    for name, top, r in rows:
        print(f"{name:18s} {top['voxels']:>11,} voxels  whole {r['whole']['growth_bytes'] / 1e6:7.1f} MB "
              f"({r['whole']['bytes_per_voxel']:5.1f} B/voxel, {r['whole']['wall_s']:5.1f} s)  z-slabs under "
              f"{top['budget_bytes'] / 1e6:.0f} MB: {r['slabs']['growth_bytes'] / 1e6:7.1f} MB "
              f"({r['slabs']['bytes_per_voxel']:5.1f} B/voxel, {r['slabs']['wall_s']:5.1f} s)  "
              f"maps equal: {r['maps_equal']}")
    out = Path(__file__).parent / "results" / "bench_memory_guard.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
