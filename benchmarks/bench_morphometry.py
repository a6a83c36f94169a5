"""Benchmark of the morphometry engine: accuracy on analytic structures, real bone vs peers, speed, batch.

Run:  .venv/bin/python benchmarks/bench_morphometry.py [--quick] [--no-peers] [--ormir] [--only PART ...] [--tag T]
Prints tables and writes benchmarks/results/bench_morphometry[_T].json (PART: accuracy, lhdl, batch).

* Accuracy: plates (axis-aligned and oblique, with their marrow: period 2t + 4), circular rods (axis-aligned
  and oblique) and spheres of known diameter, at several sizes, isotropic and anisotropic spacing, each at
  3 random sub-voxel positions. Pass: |mean error| <= max(3 %, 0.5 voxel) (voxel = the largest spacing).
* Real bone: the LHDL micro-CT cube (../shared/data/real), reference segmentation (Gaussian sigma 1 voxel,
  threshold 63), ROI = cube minus a 20-voxel margin, spheres fitted in the whole cube. Peers run in the
  separate venv .peers (porespy bf = porespy's fastest local-thickness mode, localthickness; ORMIR-XCT with
  --ormir, ~5 min) on the same binary image, side by side, with wall and CPU time and peak memory.
* Batch: patches of 64^3 from a Gaussian random field (BV/TV 0.25, Tb.Th ~3 and Tb.Sp ~6 voxels, like
  BFFE MR at 0.2-0.3 mm) through measure_batch.
* Where the time goes: CPU time of each stage of the fast local thickness (distance transform, reduced medial
  axis, sphere values, sort, painting) on the cube, and of each stage of the batch kernel per patch, one thread.
* ORMIR-XCT (--ormir) runs as plain Hildebrand (oversample=False, skeletonize=False: every phase voxel a sphere
  centre, radius to the nearest background voxel centre, i.e. BoneJ's rule; these settings reproduce the peer
  figures in ../shared/data/real/README.md) in voxel units, and the agreement of the BoneJ-convention results with
  it is recorded (target: within 3 %). Its defaults are another convention: an oversampled distance to the
  boundary, a sphere margin of 0.5 in the unit of the voxel size it is given, centres on a 2-D thinning.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctsma.morphometry import local_thickness, measure_batch  # noqa: E402

LHDL = ROOT.parent / "shared" / "data" / "real" / "lhdl_3155_D_4_bc_trabecular_uCT_200cube_19.5um.nii.gz"
PEERS = ROOT / ".peers" / "bin" / "python"
OUT = ROOT / "benchmarks" / "results" / "bench_morphometry.json"


# ----------------------------------------------------------------------------------------- accuracy
def _grid(shape, sp):
    z, y, x = np.meshgrid(*[np.arange(k) * s for k, s in zip(shape, sp)], indexing="ij")
    return z, y, x


def phantoms(n, sp, rng, quick):
    """(name, size_mm, [(binary, roi, truth_th, truth_sp)] over 3 sub-voxel offsets)."""
    h = max(sp)
    shape = tuple(int(round(n * h / s)) for s in sp)  # the same physical extent along each axis
    z, y, x = _grid(shape, sp)
    c0 = np.array([k * s / 2 for k, s in zip(shape, sp)])
    roi = np.zeros(shape, bool)
    roi[tuple(slice(k // 4, k - k // 4) for k in shape)] = True
    sizes = (3, 5, 8) if quick else (3, 4, 5, 8, 11)
    normals = {"plate-axis": (1, 0, 0), "plate-111": (1, 1, 1), "plate-110": (1, 1, 0), "plate-123": (1, 2, 3),
               "plate-oblique": (0.3, 1, 0.1)}
    for name, nv in normals.items():
        nv = np.asarray(nv, float) / np.linalg.norm(nv)
        for t in sizes:
            period = 2 * t + 4  # marrow t + 4
            with_sp = period - t <= n // 4  # marrow spheres from the ROI stay inside the image
            cases = []
            for off in rng.uniform(-0.5, 0.5, (3, 3)):
                d = (z - c0[0] + off[0] * sp[0]) * nv[0] + (y - c0[1] + off[1] * sp[1]) * nv[1] \
                    + (x - c0[2] + off[2] * sp[2]) * nv[2]
                phase = np.mod(d / h, period)
                cases.append((phase < t, roi, t * h, (period - t) * h if with_sp else None))
            yield name, t * h, cases
    for R in ((2, 3, 4.5, 8) if not quick else (2, 4.5)):
        for kind in ("sphere", "rod-axis", "rod-oblique"):
            cases = []
            for off in rng.uniform(-0.5, 0.5, (3, 3)):
                c = c0 + off * np.asarray(sp)
                p = np.stack([z - c[0], y - c[1], x - c[2]], -1)
                if kind == "sphere":
                    b, r_ = (p ** 2).sum(-1) < (R * h) ** 2, None
                elif kind == "rod-axis":
                    b, r_ = (p[..., 1:] ** 2).sum(-1) < (R * h) ** 2, roi
                else:
                    u = np.array([1, 2, 0.5]) / np.linalg.norm([1, 2, 0.5])
                    b, r_ = (p ** 2).sum(-1) - (p @ u) ** 2 < (R * h) ** 2, roi
                cases.append((b, r_, 2 * R * h, None))
            yield kind, 2 * R * h, cases


def accuracy(quick):
    rng = np.random.default_rng(7)
    rows = []
    for sp in ((1.0, 1.0, 1.0), (0.5, 1.0, 0.8)):
        n = 40 if quick else 48
        for name, size, cases in phantoms(n, sp, rng, quick):
            h = max(sp)
            for conv in ("default", "bonej"):
                errs = {"Tb.Th": [], "Tb.Sp": []}
                for b, roi, th, sep in cases:
                    m = b if roi is None else b & roi
                    errs["Tb.Th"].append(float(local_thickness(b, sp, conv)[m].mean()) - th)
                    if sep is not None:
                        mm = ~b & roi
                        errs["Tb.Sp"].append(float(local_thickness(~b, sp, conv)[mm].mean()) - sep)
                for key, e in errs.items():
                    if not e:
                        continue
                    truth = size if key == "Tb.Th" else cases[0][3]
                    tol = max(0.03 * truth, 0.5 * h)
                    rows.append({"spacing_zyx": sp, "structure": name, "param": key, "truth_mm": truth,
                                 "convention": conv, "mean_err_vox": float(np.mean(e)) / h,
                                 "worst_err_vox": float(np.max(np.abs(e))) / h,
                                 "pass_mean": abs(float(np.mean(e))) <= tol, "pass_all": float(np.max(np.abs(e))) <= tol})
    return rows


# ----------------------------------------------------------------------------------------- real bone
def lhdl_binary():
    import SimpleITK as sitk
    from scipy import ndimage
    img = sitk.ReadImage(str(LHDL))
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    return ndimage.gaussian_filter(a, 1.0) > 63, tuple(img.GetSpacing())[::-1]


PEER_CODE = r'''
import json, resource, sys, time
import numpy as np
b = np.load(sys.argv[1]); which = sys.argv[2]; h = float(sys.argv[3])
m = 20
roi = np.zeros(b.shape, bool); roi[m:-m, m:-m, m:-m] = True
t0, c0 = time.time(), time.process_time()
if which == "porespy":
    import porespy as ps
    th = 2 * ps.filters.local_thickness(b, method="bf") * h; sp = 2 * ps.filters.local_thickness(~b, method="bf") * h
elif which == "localthickness":
    import localthickness as lt
    th = 2 * lt.local_thickness(b) * h; sp = 2 * lt.local_thickness(~b) * h
else:  # plain Hildebrand (every phase voxel a centre, radius to the nearest background voxel centre): BoneJ's rule
    from ormir_xct.core.util.hildebrand_thickness import compute_local_thickness_from_mask as f
    kw = dict(oversample=False, skeletonize=False)
    th = f(b, 1.0, **kw) * h; sp = f(~b, 1.0, **kw) * h
wall, cpu = time.time() - t0, time.process_time() - c0
print(json.dumps({"Tb.Th": float(th[b & roi].mean()), "Tb.Sp": float(sp[~b & roi].mean()), "wall_s": wall,
                  "cpu_s": cpu, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
'''

OURS_CODE = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[5])
import numpy as np
from ctsma.morphometry import measure_binary
b = np.load(sys.argv[1]); conv = sys.argv[2]; method = sys.argv[3]; threads = int(sys.argv[4])
h = 0.0195
m = 20
roi = np.zeros(b.shape, bool); roi[m:-m, m:-m, m:-m] = True
measure_binary(b[:40, :40, :40], (h,) * 3, convention=conv, method=method, threads=threads, surface=False)  # compile
t0, c0 = time.time(), time.process_time()
r = measure_binary(b, (h,) * 3, roi, convention=conv, spheres="image", method=method, threads=threads, surface=False)
wall, cpu = time.time() - t0, time.process_time() - c0
r = {k: r[k] for k in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "Tb.N.plate")}
r.update(wall_s=wall, cpu_s=cpu, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
print(json.dumps(r))
'''


def _run(code, args, python):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code)
    try:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        p = subprocess.run([str(python), fh.name, *map(str, args)], capture_output=True, text=True, env=env)
    finally:
        os.unlink(fh.name)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def real_bone(peers, ormir):
    b, sp = lhdl_binary()
    h = sp[0]
    res = {"BV/TV_whole": float(b.mean()), "spacing_mm": h}
    stage_times([(b[:40, :40, :40], ~b[:40, :40, :40])], sp)  # compile
    res["cpu_s_by_stage_default_fast_1thr"] = stage_times([(b, ~b)], sp)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lhdl.npy"
        np.save(path, b)
        for conv in ("bonej", "default"):
            for method, threads in (("fast", 1), ("fast", 2), ("exact", 1)):
                key = f"ctsma/{conv}/{method}/{threads}thr"
                print(f"  {key} ...", flush=True)
                res[key] = _run(OURS_CODE, [path, conv, method, threads, ROOT / "src"], sys.executable)
        if peers and PEERS.exists():
            for which in ("porespy", "localthickness") + (("ormir",) if ormir else ()):
                print(f"  peer {which} ...", flush=True)
                res[f"peer/{which}"] = _run(PEER_CODE, [path, which, h], PEERS)
    return res


def ormir_agreement(rb):
    """Relative differences of the BoneJ-convention results from ORMIR-XCT's (a continuous-radius peer)."""
    peer = rb.get("peer/ormir", {})
    if "Tb.Th" not in peer:
        return None
    out = {"peer": {k: peer[k] for k in ("Tb.Th", "Tb.Sp")}, "tolerance": 0.03}
    for key in ("ctsma/bonej/fast/1thr", "ctsma/bonej/exact/1thr"):
        ours = rb.get(key, {})
        if "Tb.Th" in ours:
            rel = {p: ours[p] / peer[p] - 1.0 for p in ("Tb.Th", "Tb.Sp")}
            out[key] = {"rel_diff": rel, "within": all(abs(v) <= 0.03 for v in rel.values())}
    return out


def stage_times(pairs, sp, convention="default"):
    """CPU seconds of each stage of the fast local thickness, summed over (bone, marrow) pairs (one thread)."""
    from ctsma.morphometry.paint import descending_order, paint
    from ctsma.morphometry.power import reduced_axis
    from ctsma.morphometry.thickness import _values_at, distance_sq_pair
    t = dict.fromkeys(("distance transform (edt, both phases)", "reduced medial axis (power diagram)",
                       "sphere values", "sort", "painting"), 0.0)
    keys = list(t)
    clock = time.process_time
    for bone, marrow in pairs:
        c0 = clock()
        d = distance_sq_pair(bone, marrow, sp)
        t[keys[0]] += clock() - c0
        for ph in (bone, marrow):
            dsq = np.where(ph, d, np.float32(0))
            c = [clock()]
            idx = reduced_axis(ph.shape, dsq.ravel(), ph.ravel(), *sp)
            c.append(clock())
            val = _values_at(np.sqrt(dsq), idx, *sp, convention == "default")
            c.append(clock())
            order = descending_order(val)
            c.append(clock())
            paint(ph, dsq, idx[order], val[order], *sp)
            c.append(clock())
            for k, a, b in zip(keys[1:], c, c[1:]):
                t[k] += b - a
    return t


# ----------------------------------------------------------------------------------------- batch
def batch(quick):
    from scipy import ndimage
    rng = np.random.default_rng(3)
    n = 40 if quick else 120
    f = ndimage.gaussian_filter(rng.normal(size=(n, 64, 64, 64)).astype(np.float32), (0, 1.2, 1.2, 1.2))
    p = f > np.quantile(f, 0.75)
    measure_batch(p[:2], (0.3, 0.3, 0.3), workers=1)  # compile
    out = {}
    for workers in (1, 2):
        t0, c0 = time.time(), time.process_time()
        r = measure_batch(p, (0.3, 0.3, 0.3), workers=workers)
        wall, cpu = time.time() - t0, time.process_time() - c0
        out[f"{workers}_workers"] = {"patches": n, "wall_s": wall, "cpu_s": cpu, "patches_per_s": n / wall,
                                     "patches_per_cpu_s": n / cpu,
                                     "mean": {k: float(np.nanmean(v)) for k, v in r.items()}}
    k = min(n, 20)
    stages = batch_stage_times(p[:k], (0.3, 0.3, 0.3))
    out["cpu_ms_per_patch_by_stage"] = {s_: 1e3 * v / k for s_, v in stages.items()}
    return out


def batch_stage_times(patches, sp):
    """CPU seconds of each stage of measure_batch's kernel (ctsma.morphometry.batch), summed over patches."""
    from ctsma.morphometry.batch import _labels, _signed_distances
    from ctsma.morphometry.distance import edtsq_labels
    from ctsma.morphometry.paint import descending_order, paint_sum
    from ctsma.morphometry.power import reduced_axis
    from ctsma.morphometry.thickness import _values_signed
    keys = ("labels", "distance transform (both phases, one call)", "reduced medial axis (both phases, one call)",
            "signed distances", "phase balls", "sphere values", "sort", "painting (sum)")
    t = dict.fromkeys(keys, 0.0)
    clock = time.process_time
    whole = np.ones(patches.shape[1:], bool)
    for q in patches:
        c = [clock()]
        lab, _, _ = _labels(q, whole)
        c.append(clock())
        d = edtsq_labels(lab, *sp)
        c.append(clock())
        idx = reduced_axis(lab.shape, d.ravel(), lab.ravel() > 0, *sp)
        c.append(clock())
        s = _signed_distances(lab, d)
        c.append(clock())
        for i, k in enumerate(keys[:4]):
            t[k] += c[i + 1] - c[i]
        for label in (2, 1):
            c = [clock()]
            ii = idx[lab.ravel()[idx] == label]
            c.append(clock())
            val = _values_signed(s, ii, *sp, True, np.float32(1.0 if label == 2 else -1.0))
            c.append(clock())
            order = descending_order(val)
            c.append(clock())
            paint_sum(lab, label, d.ravel(), ii[order], val[order], *sp)
            c.append(clock())
            for i, k in enumerate(keys[4:]):
                t[k] += c[i + 1] - c[i]
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer phantoms and patches")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer tools")
    ap.add_argument("--ormir", action="store_true", help="also run ORMIR-XCT on the cube (several minutes)")
    ap.add_argument("--only", nargs="+", choices=("accuracy", "lhdl", "batch"), default=("accuracy", "lhdl", "batch"),
                    help="run only these parts")
    ap.add_argument("--tag", default="", help="suffix of the result file (bench_morphometry_<tag>.json)")
    args = ap.parse_args()
    out = OUT.with_name(f"bench_morphometry_{args.tag}.json") if args.tag else OUT
    load = os.getloadavg()
    result = {"machine": {"cpus": os.cpu_count(), "loadavg_at_start": load}, "date": time.strftime("%Y-%m-%d %H:%M")}

    if "accuracy" in args.only:
        report_accuracy(result, args.quick)
    if "lhdl" in args.only:
        report_lhdl(result, args)
    if "batch" in args.only:
        report_batch(result, args.quick)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["peak_rss_gb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"load average start {load[0]:.1f}, end {result['machine']['loadavg_at_end'][0]:.1f} on "
          f"{os.cpu_count()} CPUs; wrote {out}")


def report_accuracy(result, quick):
    print("== accuracy on analytic structures (errors in voxels) ==", flush=True)
    acc = accuracy(quick)
    result["accuracy"] = acc
    print(f"{'spacing':>16} {'structure':>14} {'param':>6} {'truth':>6} {'conv':>8} {'mean':>7} {'worst':>7}  pass")
    for r in acc:
        print(f"{str(r['spacing_zyx']):>16} {r['structure']:>14} {r['param']:>6} {r['truth_mm']:6.2f} "
              f"{r['convention']:>8} {r['mean_err_vox']:+7.2f} {r['worst_err_vox']:7.2f}  "
              f"{'yes' if r['pass_mean'] else 'NO'}/{'yes' if r['pass_all'] else 'no'}")
    for conv in ("default", "bonej"):
        rr = [r for r in acc if r["convention"] == conv]
        print(f"{conv}: mean error within tolerance in {sum(r['pass_mean'] for r in rr)}/{len(rr)} cases, "
              f"every position within tolerance in {sum(r['pass_all'] for r in rr)}/{len(rr)}")


def report_lhdl(result, args):
    if LHDL.exists():
        print("== LHDL cube (mm) ==", flush=True)
        rb = real_bone(not args.no_peers, args.ormir)
        result["lhdl"] = rb
        print(f"{'implementation':>28} {'Tb.Th':>7} {'Tb.Sp':>7} {'wall s':>7} {'cpu s':>7} {'peak GB':>7}")
        for k, v in rb.items():
            if k.startswith(("ctsma/", "peer/")):
                if "error" in v:
                    print(f"{k:>28} error: {v['error']}")
                    continue
                print(f"{k:>28} {v['Tb.Th']:7.4f} {v['Tb.Sp']:7.4f} {v['wall_s']:7.2f} {v['cpu_s']:7.2f} "
                      f"{v['peak_rss_gb']:7.2f}")
        ps = rb.get("peer/porespy", {})
        if "wall_s" in ps:
            best = min(v["wall_s"] for k, v in rb.items() if k.startswith("ctsma/default/fast") and "wall_s" in v)
            result["speedup_vs_porespy_wall"] = ps["wall_s"] / best
            print(f"speed-up of ctsma default/fast over porespy bf (wall, side by side): {ps['wall_s'] / best:.1f}x")
        print("ctsma default/fast, 1 thread, CPU s by stage: " +
              ", ".join(f"{k} {v:.2f}" for k, v in rb["cpu_s_by_stage_default_fast_1thr"].items()))
        agree = ormir_agreement(rb)
        if agree:
            result["ormir_agreement"] = agree
            for key, v in agree.items():
                if key.startswith("ctsma/"):
                    print(f"{key} vs ORMIR-XCT: Tb.Th {100 * v['rel_diff']['Tb.Th']:+.2f} %, "
                          f"Tb.Sp {100 * v['rel_diff']['Tb.Sp']:+.2f} % (within 3 %: {v['within']})")
    else:
        print(f"(skipping the LHDL cube: {LHDL} not found)")


def report_batch(result, quick):
    print("== batch: 64^3 patches ==", flush=True)
    result["batch"] = batch(quick)
    for k, v in result["batch"].items():
        if k.endswith("_workers"):
            print(f"{k}: {v['patches_per_s']:.1f} patches/s wall, {v['patches_per_cpu_s']:.1f} patches per CPU-second")
    print("CPU ms per patch by stage: " +
          ", ".join(f"{k} {v:.1f}" for k, v in result["batch"]["cpu_ms_per_patch_by_stage"].items()))


if __name__ == "__main__":
    main()
