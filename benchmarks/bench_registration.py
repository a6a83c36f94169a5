"""Registration benchmark on phantom knees the synthesis model never saw: TRE, time, synthesis quality.

    .venv/bin/python benchmarks/bench_registration.py [--phantom DIR] [--train 16] [--test 8]
                                                       [--model FILE] [--synthesis-preset demo]
                                                       [--variants full,demo,no_synthesis,...] [--no-peer]

Steps (all on this machine, one run, same pairs):
1. a phantom cohort (``ctsma phantom --n train+test --seed 11 --preset demo``) unless ``--phantom`` has one;
2. synthesis training on the first ``--train`` knees (no true transforms), timed; its HU MAE (bone,
   soft tissue) and SSIM on the ``--test`` held-out knees, scored with the true transforms;
3. every variant on every held-out knee: TRE at the phantom's subchondral landmarks (pooled over
   all landmarks: mean and 95th percentile), seconds per knee, bone Dice;
4. the peer: itk-elastix (default rigid + affine + B-spline maps, AdvancedMattesMutualInformation) on
   raw MR vs CT, run with the separate venv ``.peers`` (``pip install itk-elastix``) in a temp folder.

Prints a table and writes ``.bench/registration/bench_registration.json`` (``registration`` block in
the ``metrics.json`` form: ``{variant: {tre_mean_mm, tre_p95_mm, seconds_per_knee}}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctsma.io.atomic import write_json  # noqa: E402
from ctsma.io.images import read_image  # noqa: E402
from ctsma.registration.cohort import read_manifest  # noqa: E402
from ctsma.registration.masks import read_bone_labels  # noqa: E402
from ctsma.registration.pipeline import register  # noqa: E402
from ctsma.registration.presets import load_preset  # noqa: E402
from ctsma.registration.tre import read_landmarks, tre_mm  # noqa: E402
from ctsma.synthesis import SynthesisModel, load_train_config, train  # noqa: E402
from ctsma.synthesis.quality import evaluate_manifest  # noqa: E402

VARIANTS = {
    "full": ("default", {}),
    "full_demo_preset": ("demo", {}),
    "no_synthesis": ("nosynth", {}),
    "no_per_bone": ("default", {"per_bone": {"enabled": False}}),
    "global_rigid_only": ("default", {"per_bone": {"enabled": False}, "deformable": {"enabled": False},
                                      "affine": {"enabled": False}}),
}

PEER_SCRIPT = r'''
import sys, itk, numpy as np
fixed = itk.imread(sys.argv[1], itk.F); moving = itk.imread(sys.argv[2], itk.F)
po = itk.ParameterObject.New()
for name in ("rigid", "affine", "bspline"):
    pm = po.GetDefaultParameterMap(name)
    if name == "rigid":  # the scans are in different frames: start from the geometric centres
        pm["AutomaticTransformInitialization"] = ["true"]
        pm["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    pm["MaximumNumberOfSamplingAttempts"] = ["8"]
    pm["RequiredRatioOfValidSamples"] = ["0.05"]  # the CT is much larger than the MR field of view
    po.AddParameterMap(pm)
res, tp = itk.elastix_registration_method(fixed, moving, parameter_object=po, log_to_console=False, log_to_file=True, output_directory=".")
pts = np.loadtxt(sys.argv[3], ndmin=2)
with open("fixed_points.txt", "w") as fh:
    fh.write("point\n%d\n" % len(pts))
    for p in pts:
        fh.write("%f %f %f\n" % tuple(p))
itk.transformix_pointset(moving, tp, fixed_point_set_file_name="fixed_points.txt", output_directory=".")
out = []
for line in open("outputpoints.txt"):
    seg = line.split("OutputPoint = [")[1].split("]")[0]
    out.append([float(v) for v in seg.split()])
np.savetxt(sys.argv[4], np.array(out))
'''


def run_peer(ct_path: str, mr_path: str, ct_pts: np.ndarray, python: Path) -> tuple[np.ndarray, float]:
    with tempfile.TemporaryDirectory(prefix="elastix-") as tmp:  # elastix writes into the CWD
        tmp = Path(tmp)
        (tmp / "peer.py").write_text(PEER_SCRIPT)
        np.savetxt(tmp / "in.txt", ct_pts)
        t0 = time.perf_counter()
        proc = subprocess.run([str(python), "peer.py", ct_path, mr_path, "in.txt", "out.txt"], cwd=tmp,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        secs = time.perf_counter() - t0
        if proc.returncode:
            log = tmp / "elastix.log"
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            raise RuntimeError(proc.stderr[-800:] + "\n" + tail)
        return np.loadtxt(tmp / "out.txt", ndmin=2), secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phantom", default=str(ROOT / ".bench" / "phantom24"))
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--model", default=None, help="reuse this synthesis model instead of training")
    ap.add_argument("--synthesis-preset", default="demo")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-results", help="JSON {subject: {errors, seconds}} of peer runs made earlier on this "
                                           "machine (run_peer); subjects not in it are run now")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "registration"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phantom = Path(args.phantom)
    n_total = args.train + args.test
    if not (phantom / "manifest.csv").is_file():
        subprocess.run([str(ROOT / ".venv" / "bin" / "ctsma"), "--quiet", "phantom", "--n", str(n_total),
                        "--seed", "11", "--out", str(phantom), "--preset", "demo"], check=True)
    df = read_manifest(phantom / "manifest.csv")
    train_rows, test_rows = df.iloc[: args.train], df.iloc[args.train: n_total]
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_avg_start": os.getloadavg()},
                    "phantom": str(phantom), "train_subjects": list(train_rows.subject),
                    "test_subjects": list(test_rows.subject)}

    # 1. synthesis
    model_path = Path(args.model) if args.model else out / "synthesis.safetensors"
    if args.model and model_path.is_file():
        model = SynthesisModel.load(model_path)
        report["synthesis_training"] = {"reused": str(model_path), **model.meta.get("training", {})}
        report["train_subjects"] = model.meta.get("training", {}).get("subjects", [])
        overlap = set(report["train_subjects"]) & set(test_rows.subject)
        if overlap:
            raise SystemExit(f"the reused model was trained on test knees {sorted(overlap)}")
    else:
        cfg = load_train_config(args.synthesis_preset, {"threads": args.threads} if args.threads else None)
        pairs = []
        for r in train_rows.to_dict("records"):
            ct = read_image(r["ct"], what="CT")
            pairs.append((read_image(r["mr"], what="MR"), ct, read_bone_labels(r["ct_bones"], ct)))
        t0 = time.perf_counter()
        model = train(pairs, cfg, names=list(train_rows.subject))
        report["synthesis_training"] = {"seconds": time.perf_counter() - t0, "preset": args.synthesis_preset,
                                        **model.meta["training"]}
        model.save(model_path)
    q = evaluate_manifest(test_rows, model)
    report["synthesis_quality"] = q
    print(f"synthesis on {len(test_rows)} held-out knees: HU MAE bone {q['summary']['mae_bone_hu']:.1f}, "
          f"soft tissue {q['summary']['mae_soft_hu']:.1f}, SSIM {q['summary']['ssim']:.3f}", flush=True)

    # 2. variants
    variants = [v for v in args.variants.split(",") if v]
    errs = {v: [] for v in variants}
    secs = {v: [] for v in variants}
    dice = {v: [] for v in variants}
    per_knee = []
    peer_py = ROOT / ".peers" / "bin" / "python"
    use_peer = not args.no_peer and peer_py.is_file()
    if use_peer:
        errs["peer_elastix_mi"], secs["peer_elastix_mi"], dice["peer_elastix_mi"] = [], [], []
    for r in test_rows.to_dict("records"):
        mr, ct = read_image(r["mr"], what="MR"), read_image(r["ct"], what="CT")
        ct_bones = read_bone_labels(r["ct_bones"], ct)
        mr_bones = read_bone_labels(r["mr_bones"], mr, what="MR bone labels")
        lm = read_landmarks(r["landmarks"])
        t0 = time.perf_counter()
        pct = model.apply(mr)
        t_syn = time.perf_counter() - t0
        row = {"subject": r["subject"], "synthesis_s": t_syn}
        for v in variants:
            name, over = VARIANTS[v]
            preset = load_preset(name, {**over, **({"threads": args.threads} if args.threads else {})})
            t0 = time.perf_counter()
            res = register(mr, ct, preset=preset, ct_bones=ct_bones, mr_bones=mr_bones,
                           pseudo_ct=pct if preset.use_synthesis else None)
            s = time.perf_counter() - t0 + (t_syn if preset.use_synthesis else 0.0)
            e = tre_mm(res.transform, lm)
            errs[v].append(e), secs[v].append(s), dice[v].append(res.bone_dice.get("mean", np.nan))
            row[v] = {"tre_mean_mm": float(e.mean()), "seconds": s,
                      "rejected": [st.name for st in res.stages if not st.kept]}
            print(f"{r['subject']} {v:<20} TRE {e.mean():.3f} mm  {s:.1f} s", flush=True)
        if use_peer:
            ct_pts = lm[["ct_x", "ct_y", "ct_z"]].to_numpy(float)
            cached = {}
            if args.peer_results and Path(args.peer_results).is_file():  # read now: may be filled meanwhile
                cached = json.loads(Path(args.peer_results).read_text())
            try:
                if r["subject"] in cached:
                    e, s = np.asarray(cached[r["subject"]]["errors"]), float(cached[r["subject"]]["seconds"])
                else:
                    mapped, s = run_peer(r["ct"], r["mr"], ct_pts, peer_py)
                    e = np.linalg.norm(mapped - lm[["mr_x", "mr_y", "mr_z"]].to_numpy(float), axis=1)
                errs["peer_elastix_mi"].append(e), secs["peer_elastix_mi"].append(s)
                row["peer_elastix_mi"] = {"tre_mean_mm": float(e.mean()), "seconds": s,
                                          "from_cache": r["subject"] in cached}
                print(f"{r['subject']} {'peer_elastix_mi':<20} TRE {e.mean():.3f} mm  {s:.1f} s", flush=True)
            except RuntimeError as exc:
                row["peer_elastix_mi"] = {"error": str(exc)[-300:]}
                print(f"{r['subject']} peer failed: {str(exc)[-200:]}", flush=True)
        per_knee.append(row)

    table = {}
    for v in errs:
        if not errs[v]:
            continue
        e = np.concatenate(errs[v])
        table[v] = {"tre_mean_mm": float(e.mean()), "tre_p95_mm": float(np.percentile(e, 95)),
                    "tre_max_mm": float(e.max()), "seconds_per_knee": float(np.mean(secs[v])),
                    "bone_dice_mean": float(np.nanmean(dice[v])) if dice[v] else None,
                    "n_knees": len(errs[v]), "n_landmarks": int(e.size)}
    report.update({"registration": table, "per_knee": per_knee, "load_avg_end": os.getloadavg()})
    write_json(out / "bench_registration.json", report)
    print(f"\n{'variant':<20} {'TRE mean':>9} {'TRE p95':>8} {'max':>6} {'s/knee':>7} {'Dice':>6}")
    for v, t in table.items():
        d = t["bone_dice_mean"]
        print(f"{v:<20} {t['tre_mean_mm']:9.3f} {t['tre_p95_mm']:8.3f} {t['tre_max_mm']:6.2f} "
              f"{t['seconds_per_knee']:7.1f} {'' if d is None else f'{d:6.3f}'}")
    print(f"\nwritten {out / 'bench_registration.json'}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
