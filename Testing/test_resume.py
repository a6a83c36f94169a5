"""Kill and resume: a long stage killed with SIGKILL mid-run (no clean-up of any kind), then run again,
gives the same result as an uninterrupted run, and leaves no partial file behind.

Covered here, each through the command line in a subprocess: the phantom cohort, the registration cohort, the
dataset builder and batch inference. Training has its own SIGKILL test in test_train.py. See docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from test_phantom import TINY

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _ctsma(*args) -> list[str]:
    return [sys.executable, "-m", "ctsma.cli.main", "--quiet", *map(str, args)]


def _kill_when(argv: list[str], ready, timeout: float = 240.0) -> bool:
    """Run ``argv``; SIGKILL it as soon as ``ready()`` holds. Returns whether it was killed before finishing."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < end:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def _same_image(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize() and ia.GetSpacing() == ib.GetSpacing() and ia.GetOrigin() == ib.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ia), sitk.GetArrayViewFromImage(ib), err_msg=a.name)


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}


def _no_partials(root: Path) -> None:
    left = [p for p in root.rglob("*") if ".partial" in p.name or p.name.startswith(".staging-")]
    assert not left, left


def test_phantom_killed_mid_cohort_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    n, seed = 2, 5
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert subprocess.run(_ctsma("phantom", "--n", n, "--seed", seed, "--config", cfg, "--out", ref),
                          env=ENV, capture_output=True).returncode == 0
    argv = _ctsma("phantom", "--n", n, "--seed", seed, "--config", cfg, "--out", run)
    killed = _kill_when(argv, lambda: (run / "P0000" / "metadata.json").is_file())
    assert killed and not (run / "manifest.csv").exists() and not (run / f"P{n - 1:04d}").exists()
    done_before = (run / "P0000" / "mr.nii.gz").stat().st_mtime_ns
    assert subprocess.run(argv, env=ENV, capture_output=True).returncode == 0
    assert (run / "P0000" / "mr.nii.gz").stat().st_mtime_ns == done_before  # a finished knee is not redone
    _no_partials(run)
    fa, fb = _files(ref), _files(run)
    assert sorted(fa) == sorted(fb)
    for name, a in fa.items():
        b = fb[name]
        if name.endswith(".nii.gz"):
            _same_image(a, b)
        elif name.endswith(".h5"):  # HDF5 stores object times: compare the transform parameters
            ta = sitk.CompositeTransform(sitk.ReadTransform(str(a))).GetNthTransform(0).GetParameters()
            tb = sitk.CompositeTransform(sitk.ReadTransform(str(b))).GetNthTransform(0).GetParameters()
            assert ta == tb
        elif a.name in ("metadata.json", "phantom.json"):
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            for m in (ma, mb):
                m.pop("timing_s", None), m.pop("cpu_s", None), m.get("truth", {}).pop("pid", None)
            assert ma == mb, name
        else:
            assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest(), name


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from ctsma.phantom import generate_cohort, make_settings

    out = tmp_path_factory.mktemp("resume") / "cohort"
    generate_cohort(make_settings("demo", TINY), 2, 11, out, workers=1)
    rows = pd.read_csv(out / "manifest.csv")
    for r in rows.itertuples():
        lab = sitk.ReadImage(str(out / r.ct_bones))
        sitk.WriteImage(sitk.Threshold(lab, 0, 9, 0), str(out / f"{r.subject}_bones.nii.gz"))  # bones only
    pd.DataFrame({"subject": rows.subject, "ct": rows.ct,
                  "ct_bones": [f"{s}_bones.nii.gz" for s in rows.subject]}).to_csv(out / "batch.csv", index=False)
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    import torch

    from ctsma.models.export import build_meta, export_model
    from ctsma.models.networks import PatchRegressor

    torch.manual_seed(0)
    net = PatchRegressor(2, 16, widths=(4, 8, 8, 8), head_hidden=8)
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8.0, masks=True,
                      intensity_offset=0.0, intensity_scale=1000.0, target="mr", y_mean=np.full(4, 0.5),
                      y_sd=np.full(4, 0.1), training={}, metrics={})
    return export_model(tmp_path_factory.mktemp("model") / "student.safetensors", net, meta)


def test_batch_inference_killed_mid_cohort_resumes_to_the_uninterrupted_result(cohort, student, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ("infer", cohort / "batch.csv", "--model", student, "--device", "cpu")
    res = subprocess.run(_ctsma(*args, "--out", ref), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    subjects = list(pd.read_csv(cohort / "batch.csv").subject)
    killed = _kill_when(_ctsma(*args, "--out", run), lambda: (run / subjects[0] / "summary.json").is_file())
    assert killed and not (run / subjects[-1] / "summary.json").exists()
    first = (run / subjects[0] / "summary.json").stat().st_mtime_ns
    res = subprocess.run(_ctsma(*args, "--out", run), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (run / subjects[0] / "summary.json").stat().st_mtime_ns == first  # finished knee not redone
    status = json.loads((run / "batch_status_0of1.json").read_text())
    assert status[0]["status"] == "done earlier" and all(s["status"] == "ok" for s in status[1:])
    _no_partials(run)
    for s in subjects:
        fa, fb = _files(ref / s), _files(run / s)
        assert sorted(fa) == sorted(fb)
        for name, a in fa.items():
            if name.endswith(".nii.gz"):
                _same_image(a, fb[name])
            elif name.endswith(".csv"):
                pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(fb[name]))
            else:
                sa, sb = json.loads(a.read_text()), json.loads(fb[name].read_text())
                for m in (sa, sb):
                    m.pop("seconds"), m.pop("ct"), m["model"].pop("path", None)
                assert sa == sb


def test_registration_cohort_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    from ctsma.config import read_mapping
    from knee_pair import make_knee_pair
    from ctsma.resources import resource_path

    pair = make_knee_pair(3)
    rows = ["subject,mr,ct,ct_bones"]
    for s in ("kA", "kB"):
        for name in ("mr", "ct", "ct_bones"):
            sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{s}_{name}.nii.gz"))
        rows.append(f"{s},{s}_mr.nii.gz,{s}_ct.nii.gz,{s}_ct_bones.nii.gz")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    preset = read_mapping(resource_path("Presets", "registration", "nosynth.json"))
    preset.update(threads=1, deformable={"enabled": False}, per_bone={"enabled": False},
                  rigid={**preset.get("rigid", {}), "iterations": 10})
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ("register", "--manifest", tmp_path / "manifest.csv", "--preset", tmp_path / "preset.json")
    res = subprocess.run(_ctsma(*args, "--out", ref), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    killed = _kill_when(_ctsma(*args, "--out", run), lambda: (run / "kA" / "qa.json").is_file())
    assert killed and not (run / "kB" / "qa.json").exists()
    res = subprocess.run(_ctsma(*args, "--out", run), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    summary = pd.read_csv(run / "cohort_0of1.csv")
    assert list(summary.status) == ["skipped (done before)", "done"]
    _no_partials(run)
    pts = [tuple(map(float, p)) for p in pair.landmarks[:, 1:4]]
    for s in ("kA", "kB"):
        ta = sitk.ReadTransform(str(ref / s / "transform_ct_to_mr.h5"))
        tb = sitk.ReadTransform(str(run / s / "transform_ct_to_mr.h5"))
        np.testing.assert_allclose([ta.TransformPoint(p) for p in pts], [tb.TransformPoint(p) for p in pts],
                                   atol=1e-9)
        _same_image(ref / s / "mr_in_ct.nii.gz", run / s / "mr_in_ct.nii.gz")


def test_dataset_build_killed_mid_run_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    import h5py

    cfg = tmp_path / "ds.yaml"
    cfg.write_text(json.dumps(dict(max_per_roi=4, stride_mm=3.0, mr_size=16, truth=False, min_per_roi=1,
                                   quality=False, transform_column="transform_ct_to_mr")))
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = ("dataset", "build", "--manifest", cohort / "manifest.csv", "--config", cfg)
    res = subprocess.run(_ctsma(*args, "--out", ref), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    def finished_shards():  # not the hidden temporary of a shard being written
        return [p for p in (run / ".shards").glob("*.npz") if not p.name.startswith(".")]

    killed = _kill_when(_ctsma(*args, "--out", run), lambda: bool(finished_shards()))
    assert killed and not (run / "patches.h5").exists()
    shard = finished_shards()[0]
    done_before = shard.stat().st_mtime_ns
    res = subprocess.run(_ctsma(*args, "--out", run), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert shard.stat().st_mtime_ns == done_before  # the finished subject was reused, not rebuilt
    _no_partials(run)
    pd.testing.assert_frame_equal(pd.read_csv(ref / "patches.csv"), pd.read_csv(run / "patches.csv"))
    with h5py.File(ref / "patches.h5", "r") as a, h5py.File(run / "patches.h5", "r") as b:
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)


def test_sigterm_stops_the_workers_too(tmp_path):
    """SIGTERM (scancel, a cluster's time limit, Slicer's Cancel) is handled as Ctrl-C: exit 143 with a message, the
    worker pool terminated (before, the workers went on alone and then hung), no partial file; a rerun resumes."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    argv = _ctsma("phantom", "--n", 4, "--seed", 5, "--config", cfg, "--workers", 2, "--out", run)
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the workers' too
    end = time.monotonic() + 240
    while proc.poll() is None and not list(run.glob("P*/metadata.json")) and time.monotonic() < end:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "a rerun resumes" in err, (proc.returncode, err)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # every process of the group gone: no orphaned worker
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the command")
    done = sorted(p.parent.name for p in run.glob("P*/metadata.json"))
    assert done  # what was finished before the signal was kept
    # (a worker stopped mid-knee may leave its hidden partial folder, as after SIGKILL: the rerun removes it)
    assert subprocess.run(argv, env=ENV, capture_output=True).returncode == 0
    assert sorted(p.parent.name for p in run.glob("P*/metadata.json")) == [f"P{i:04d}" for i in range(4)]
    _no_partials(run)
