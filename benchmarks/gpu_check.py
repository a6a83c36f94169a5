"""GPU check: python3 benchmarks/gpu_check.py [--out DIR] [--parts train,infer,demo] [--epochs N] [--demo-knees N]

For a machine with a CUDA GPU (the CPU path is what the test suite covers). It runs the command line as a user
would and writes what it checked to DIR/gpu_check.json (exit status 1 if a check fails). Parts:

* ``train``: on a synthetic store (20 subjects x 64 patches, ctsma.dataset.synthetic), with
  Resources/Configs/gpu.yaml (the larger networks, accelerator auto, precision auto) and validation every 2 epochs,
  ``ctsma train teacher|student|baseline`` then ``ctsma evaluate``; a second teacher is killed mid-run and resumed
  with ``--resume``. Checks: each model file exported from the GPU with bf16 mixed precision (the model file's
  training record), progress.jsonl with validation values exactly on the validated epochs (every 2nd and the last)
  and null elsewhere, finite ICCs from `evaluate`, the resumed run finishing at the last epoch; each training's
  seconds.
* ``infer``: one phantom knee (cohort seed 101, which the shipped model never saw); ``ctsma infer`` with the shipped
  student on the GPU and on the CPU. Checks: both finish, ``summary.json`` names the device, the ROI tables and the
  ten maps agree (largest difference of a map relative to its range, at most 1e-3: the GPU's convolutions round
  otherwise), and the OA probability agrees to 1e-3; each run's seconds.
* ``demo``: ``ctsma demo --n N --workers W`` end to end (synthesis and inference on the GPU, the demo's CNNs on
  the CPU as its config says). Checks: it finishes with ``metrics.json``, the study report and the scene (where
  slicer-core is installed; the demo skips it otherwise); the stage seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ctsma(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctsma.cli.main", *map(str, args)], capture_output=True, text=True,
                          **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ctsma_gpu_check")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--config", default=str(REPO / "Resources" / "Configs" / "gpu.yaml"))
    ap.add_argument("--cpu", dest="gpu", action="store_false", help="check the script itself on a CPU (with "
                    "--config Resources/Configs/demo.yaml): expects CPU training in 32 bits")
    ap.add_argument("--parts", default="train,infer", help="comma-separated: train, infer, demo")
    ap.add_argument("--demo-knees", type=int, default=12)
    ap.add_argument("--workers", type=int, default=8, help="the demo part's workers")
    a = ap.parse_args()
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpus": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "checks": {}, "seconds": {}}
    parts = a.parts.split(",")
    for part, fn in (("train", check_train), ("infer", check_infer), ("demo", check_demo)):
        if part in parts:
            fn(a, out, res)
            (out / "gpu_check.json").write_text(json.dumps(res, indent=1))  # what is done so far, if time runs out
    res["ok"] = all(res["checks"].values())
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


def check_train(a, out: Path, res: dict) -> None:
    from ctsma.dataset.synthetic import make_synthetic_store
    from ctsma.modelfile import read_metadata

    store = make_synthetic_store(out / "store", n_subjects=20, patches_per_subject=64)
    cfg = a.config
    opts = ["--config", cfg, "--store", store.dir, "--set", f"optim.max_epochs={a.epochs}", "--set", "optim.val_every=2",
            "--set", "trainer.progress_bar=false"]
    checks = res["checks"]
    for which, role in (("teacher", "teacher"), ("student", "student_distilled"), ("baseline", "student_baseline")):
        t = time.perf_counter()
        p = ctsma("train", which, *opts, "--out", out / "run")
        res["seconds"][which] = round(time.perf_counter() - t, 1)
        checks[f"{which}_exit_0"] = p.returncode == 0
        if p.returncode:
            res[f"{which}_stderr"] = p.stderr[-3000:]
            continue
        hw = read_metadata(out / "run" / f"{role}.safetensors")["training"]["hardware"]
        res[f"{which}_hardware"] = hw
        checks[f"{which}_device_and_precision_as_expected"] = hw["device"].startswith("cuda") == a.gpu and \
            (hw["precision"] == "bf16-mixed" or not a.gpu)
        rows = [json.loads(line) for line in (out / "run" / role / "progress.jsonl").read_text().splitlines()]
        epochs = [r for r in rows if r.get("event") == "epoch"]
        validated = [r["epoch"] for r in epochs if r.get("val_loss") is not None]
        res[f"{which}_validated_epochs"] = validated
        want = sorted({e for e in range(2, a.epochs + 1, 2)} | {a.epochs})
        checks[f"{which}_validates_every_2_and_last"] = validated == want and len(epochs) == a.epochs
    t = time.perf_counter()
    p = ctsma("evaluate", "--config", cfg, "--store", store.dir, "--models", out / "run", "--out", out / "eval",
              "--set", "evaluate.ablations=[]")
    res["seconds"]["evaluate"] = round(time.perf_counter() - t, 1)
    checks["evaluate_exit_0"] = p.returncode == 0
    if p.returncode == 0:
        m = json.loads((out / "eval" / "metrics.json").read_text())
        res["mean_icc21"] = {k: v.get("mean_icc21") for k, v in m.get("regression", {}).items()}
        checks["evaluate_icc_finite"] = all(isinstance(v, float) for v in res["mean_icc21"].values())
    else:
        res["evaluate_stderr"] = p.stderr[-3000:]
    # kill a teacher mid-run (after its first checkpoint) and resume it
    rdir = out / "resume"
    cmd = [sys.executable, "-m", "ctsma.cli.main", "train", "teacher", *map(str, opts), "--out", str(rdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = rdir / "teacher" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and not last.is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    checks["resume_run_was_killed_mid_training"] = killed
    p = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    checks["resume_exit_0"] = p.returncode == 0
    if p.returncode == 0:
        rows = [json.loads(line) for line in (rdir / "teacher" / "progress.jsonl").read_text().splitlines()]
        checks["resume_reaches_last_epoch"] = max(r.get("epoch", 0) for r in rows if r.get("event") == "epoch") \
            == a.epochs and (rdir / "teacher.safetensors").is_file()
    else:
        res["resume_stderr"] = p.stderr[-3000:]


def check_infer(a, out: Path, res: dict) -> None:
    import numpy as np
    import pandas as pd
    import SimpleITK as sitk

    checks = res["checks"]
    p = ctsma("phantom", "--n", 1, "--seed", 101, "--out", out / "knee")
    checks["infer_phantom_exit_0"] = p.returncode == 0
    if p.returncode:
        res["phantom_stderr"] = p.stderr[-3000:]
        return
    ct = out / "knee" / "P0000" / "ct.nii.gz"
    devices = ("cuda", "cpu") if a.gpu else ("cpu", "cpu")
    runs = []
    for i, dev in enumerate(devices):
        d = out / f"infer_{i}_{dev}"
        t = time.perf_counter()
        p = ctsma("infer", ct, "--out", d, "--device", dev)
        res["seconds"][f"infer_{i}_{dev}"] = round(time.perf_counter() - t, 1)
        checks[f"infer_{i}_{dev}_exit_0"] = p.returncode == 0
        if p.returncode:
            res[f"infer_{i}_{dev}_stderr"] = p.stderr[-3000:]
            return
        summary = json.loads((d / "summary.json").read_text())
        checks[f"infer_{i}_{dev}_device_recorded"] = summary.get("device") == dev
        runs.append((d, summary))
    (d0, s0), (d1, s1) = runs
    t0, t1 = pd.read_csv(d0 / "roi_table.csv"), pd.read_csv(d1 / "roi_table.csv")
    a0, a1 = t0["mean"].to_numpy(float), t1["mean"].to_numpy(float)
    same_nan = bool(np.array_equal(np.isnan(a0), np.isnan(a1)))
    rel = float(np.nanmax(np.abs(a0 - a1) / np.maximum(np.abs(a1), 1e-9))) if np.isfinite(a1).any() else 0.0
    res["infer_roi_table_max_rel_diff"] = rel
    checks["infer_roi_tables_agree"] = list(t0["roi"]) == list(t1["roi"]) and same_nan and rel <= 1e-3
    worst = 0.0
    maps = sorted(p.relative_to(d1) for p in d1.rglob("*.nii.gz"))
    for m in maps:
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(d0 / m))).astype(np.float64)
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(d1 / m))).astype(np.float64)
        fin = np.isfinite(y)
        if not np.array_equal(np.isfinite(x), fin):
            worst = np.inf
            continue
        if fin.any():  # relative to the map's range (absolute for a constant map)
            span = float(np.ptp(y[fin]))
            worst = max(worst, float(np.max(np.abs(x[fin] - y[fin]))) / (span or 1.0))
    res["infer_maps"] = [str(m) for m in maps]
    res["infer_map_max_diff_over_range"] = worst
    checks["infer_maps_agree"] = len(maps) >= 10 and worst <= 1e-3
    p0, p1 = s0.get("oa_probability"), s1.get("oa_probability")
    res["infer_oa_probability"] = [p0, p1]
    checks["infer_oa_probability_agrees"] = p0 is not None and p1 is not None and abs(p0 - p1) <= 1e-3


def check_demo(a, out: Path, res: dict) -> None:
    checks = res["checks"]
    d = out / "demo"
    t = time.perf_counter()
    p = ctsma("demo", "--n", a.demo_knees, "--workers", a.workers, "--out", d)
    res["seconds"]["demo"] = round(time.perf_counter() - t, 1)
    checks["demo_exit_0"] = p.returncode == 0
    if p.returncode:
        res["demo_stderr"] = p.stderr[-3000:]
        return
    m = json.loads((d / "metrics.json").read_text())
    res["demo_stage_seconds"] = m.get("timing")
    res["demo_mean_icc21"] = {k: v.get("mean_icc21") for k, v in m.get("regression", {}).items()}
    res["demo_files"] = sorted(str(f.relative_to(d)) for f in d.glob("*/*") if f.suffix in (".pdf", ".mrb", ".html"))
    from ctsma.demo.outputs import _slicer_lib

    res["demo_scene_expected"] = _slicer_lib()  # without slicer-core the demo skips the scene, with a warning
    checks["demo_outputs_written"] = "report/study.pdf" in res["demo_files"] and \
        any(f.startswith("scene/") and f.endswith(".mrb") for f in res["demo_files"]) == res["demo_scene_expected"]


if __name__ == "__main__":
    sys.exit(main())
