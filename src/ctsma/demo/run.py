"""``run_demo``: every stage of CT-SMA on the digital phantom, cached, with one progress display."""

from __future__ import annotations

import time
from pathlib import Path

from .. import progress
from ..io import ensure_writable_dir
from ..pipeline import Stage, StageRunner, code_fingerprint
from . import stages
from .outputs import check_demo_folder, remove_earlier_outputs, report
from .settings import DemoSettings


def run_demo(out_dir, settings: DemoSettings | None = None) -> dict:
    s = settings or DemoSettings()
    stages.check_settings(s)  # a missing file or a setting that a later stage would refuse: before the folder is made
    check_demo_folder(Path(out_dir))  # before anything is made in it
    out = ensure_writable_dir(out_dir).resolve()  # configs resolve relative paths against their own folder
    ctx = stages.Context(out, s)
    runner = StageRunner(out, code=code_fingerprint())
    plan = [
        # knee i is the same whatever n (its parameters come from the seed and i alone): a changed n keeps the knees
        Stage("phantom", lambda d: stages.phantom(ctx, d), {"seed": s.seed, "preset": s.phantom_preset},
              "generate the phantom cohort", extent={"n": s.n}),
        # trained on the first synthesis_knees knees (by subject ID), the same whatever n
        Stage("synthesis", lambda d: stages.synthesis(ctx, d), {"knees": s.synthesis_knees},
              "train MR->pseudo-CT synthesis", extent_free=True),
        # the variants are compared on their own: no later stage reads them, and each knee's registration is the
        # same whatever the number of variant knees or of knees (up to rounding when fewer pairs than workers are
        # left to register: they get more threads); each pair's request is checked before it is skipped
        Stage("registration", lambda d: stages.registration(ctx, d), stages.registration_key(s),
              "register every MR to its CT", own={"variant_knees": s.variant_knees}, per_unit=True),
        # each knee's shard is keyed by its images' and registration's stamps before it is reused
        Stage("dataset", lambda d: stages.dataset(ctx, d), stages.dataset_settings(ctx).__dict__,
              "build the paired patch dataset", per_unit=True),
        Stage("training", lambda d: stages.training(ctx, d), stages.training_key(ctx),
              f"train teacher, distilled and baseline students ({s.folds}-fold cross-fitting)"),
        Stage("evaluation", lambda d: stages.evaluation(ctx, d), stages.evaluation_key(ctx),
              "evaluate on held-out patients"),
        Stage("diagnosis", lambda d: stages.diagnosis(ctx, d),
              {"aggregators": s.aggregators, "folds": s.diagnosis_folds}, "train and evaluate OA diagnosis"),
        Stage("inference", lambda d: stages.inference(ctx, d), None, "CT-only inference on a held-out knee"),
        Stage("report", lambda d: report(ctx, d, dict(runner.timings)), {"t": time.time()},
              "write metrics, reports and the Slicer scene"),
    ]
    if any(name != "report" for name in runner.pending(plan)):  # the report stage always runs
        remove_earlier_outputs(out)
    t0 = time.perf_counter()
    summaries = runner.run_all(plan)
    summaries["_timings"] = dict(runner.timings)
    summaries["_wall_seconds"] = time.perf_counter() - t0
    return summaries


def print_summary(out: Path, summaries: dict) -> None:
    import json

    m = json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
    reg = m.get("regression", {})
    say = progress.info
    say("")
    say("CT-SMA demo: results on the digital phantom (every prediction out-of-sample for its patient)")
    for src in ("teacher", "student_distilled", "student_baseline", "ct_direct"):
        b = reg.get(src)
        if b:
            per = ", ".join(f"{p} {b[p]['icc21']:.3f}" for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")
                            if b.get(p, {}).get("icc21") is not None)
            say(f"  ICC(2,1) vs MR  {src:18s} mean {b['mean_icc21'] or float('nan'):.3f}  ({per})")
    g = m.get("distillation_gain")
    if g:
        say(f"  distillation gain in mean ICC: {g['mean_icc21_diff']:+.3f} (95 % CI {g['ci'][0]:+.3f} to {g['ci'][1]:+.3f})")
    for key, v in sorted(m.get("diagnosis", {}).items()):
        say(f"  AUC {key:34s} {v['auc']:.3f} [{v['auc_ci'][0]:.3f}, {v['auc_ci'][1]:.3f}]")
    r = m.get("registration", {}).get("full")
    if r:
        say(f"  registration TRE (unseen knees): mean {r['tre_mean_mm']:.2f} mm, p95 {r['tre_p95_mm']:.2f} mm")
    total = sum(m.get("timing", {}).values())
    say("  stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in m.get("timing", {}).items())
        + f"; total {total / 60:.1f} min")
    say(f"  study report: {Path(out) / 'report' / 'study.html'}")
