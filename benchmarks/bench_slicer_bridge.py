"""Time the Slicer scene bridge: .venv/bin/python benchmarks/bench_slicer_bridge.py [--size 512 512 300]

Runs against the headless MRML scene of the slicer-core wheel (no Slicer application):
a float32 CT-sized volume SimpleITK -> volume node -> SimpleITK, a 4-label image -> named
segmentation -> label image, a B-spline and a displacement-field transform into transform
nodes, and a .mrb save of the scene (uncompressed storage). Prints a table and writes
benchmarks/results/bench_slicer_bridge.json. Wall-clock on a shared machine: note the load
average printed.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "CTSMA"))

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
a = ap.parse_args()

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from CTSMALib import scene_bridge as sb  # noqa: E402
from CTSMALib.headless import HeadlessSlicer  # noqa: E402


def timed(label, fn, res):
    t0 = time.perf_counter()
    out = fn()
    res[label] = time.perf_counter() - t0
    return out


res = {"size_xyz": a.size, "load_average_1min": os.getloadavg()[0]}
rng = np.random.default_rng(0)
nx, ny, nz = a.size
img = sitk.GetImageFromArray(rng.normal(size=(nz, ny, nx)).astype(np.float32))
img.SetSpacing((0.4, 0.4, 0.6))
img.SetDirection(tuple(np.array(sitk.VersorTransform((0.1, 0.2, 0.9), 0.3).GetMatrix())))
lab_arr = np.zeros((nz, ny, nx), np.uint8)
for v, sl in enumerate([np.s_[: nz // 2, : ny // 2], np.s_[: nz // 2, ny // 2:], np.s_[nz // 2:, : ny // 2],
                        np.s_[nz // 2:, ny // 2:]], 1):
    lab_arr[sl] = v
lab = sitk.GetImageFromArray(lab_arr)
lab.CopyInformation(img)
bs = sitk.BSplineTransformInitializer(img, [8, 8, 8])
bs.SetParameters(tuple(rng.normal(size=len(bs.GetParameters()))))
field = sitk.GetImageFromArray(rng.normal(size=(nz // 4, ny // 4, nx // 4, 3)), isVector=True)
field.SetSpacing((1.6, 1.6, 2.4))
df = sitk.DisplacementFieldTransform(field)

with tempfile.TemporaryDirectory() as tmp, HeadlessSlicer(cache_dir=Path(tmp) / "cache") as h:
    node = timed("volume_to_node_s", lambda: sb.sitk_to_volume_node(img, h.scene, "CT"), res)
    timed("node_to_volume_s", lambda: sb.volume_node_to_sitk(node), res)
    seg = timed("labels_to_segmentation_s", lambda: sb.labelmap_to_segmentation_node(lab, h.scene, sb.ROI_NAMES), res)
    timed("segmentation_to_labels_s", lambda: sb.segmentation_node_to_labelmap(seg, node), res)
    timed("bspline_to_node_s", lambda: sb.sitk_transform_to_node(bs, h.scene, "bspline"), res)
    timed("displacement_field_to_node_s", lambda: sb.sitk_transform_to_node(df, h.scene, "field"), res)
    path = timed("save_mrb_s", lambda: sb.save_scene_mrb(h.scene, Path(tmp) / "scene.mrb"), res)
    res["mrb_mb"] = path.stat().st_size / 1e6
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

print(f"{'step':34s} {'value':>10s}")
for k, v in res.items():
    print(f"{k:34s} {str(v) if isinstance(v, list) else round(v, 3):>10}")
out = REPO / "benchmarks" / "results" / "bench_slicer_bridge.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=2) + "\n")
print(f"wrote {out}")
