"""GPU check of the training entry point: python3 benchmarks/gpu_check.py [--out DIR] [--epochs N]

For a machine with a CUDA GPU (the CPU path is what the test suite covers). On a synthetic store (20 subjects x
64 patches, ctsma.dataset.synthetic) it runs the command line as a user would, with Resources/Configs/gpu.yaml
(the larger networks, accelerator auto, precision auto) and validation every 2 epochs:
``ctsma train teacher|student|baseline`` then ``ctsma evaluate``; a second teacher is killed mid-run and resumed
with ``--resume``. It checks, and writes to DIR/gpu_check.json: each model file exported from the GPU with bf16
mixed precision (the model file's training record), progress.jsonl with validation values exactly on the
validated epochs (every 2nd and the last) and null elsewhere, finite ICCs from `evaluate`, the resumed run
finishing at the last epoch, and each training's seconds. Exit status 1 if a check fails.
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
    a = ap.parse_args()
    import torch

    from ctsma.dataset.synthetic import make_synthetic_store
    from ctsma.modelfile import read_metadata

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "checks": {}, "seconds": {}}
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
    res["ok"] = all(checks.values())
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
