"""Time and score the diagnosis aggregators: .venv/bin/python benchmarks/bench_diagnosis.py [--n 24] [--patches 24]

Synthetic cohort (ctsma.diagnosis.synthetic: OA raises BV/TV and Tb.Th, most in MTP) seen through four
"sources" of decreasing quality (truth, mr_reference, student_distilled, student_baseline = patch-level
noise 0, 0.3, 0.6, 1.2 × population SD), every aggregator × source cross-validated with the same 5 patient
folds (the demo's work), then one transformer trained on all knees (the `ctsma diagnose train` fit).
With --labels/--tables, real tables (e.g. from the phantom demo) are used instead of synthetic ones; with --demo DIR
the out-of-fold tables, labels and folds of a finished demo run (its diagnosis stage's exact work).
With --workers 1,2 the cross-validations run once per worker count (processes side by side, `compare_sources(...,
workers=)`), their results are checked to be identical and the wall times compared.
Prints a table and writes benchmarks/results/bench_diagnosis.json. Timings are wall-clock on a shared machine.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="knees (demo cohort size)")
    ap.add_argument("--patches", type=int, default=24, help="patches per ROI and knee (dataset default max_per_roi)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aggregators", default="transformer,mlp,logistic")
    ap.add_argument("--labels", default=None, help="labels CSV (with --tables)")
    ap.add_argument("--tables", nargs="*", default=None, metavar="SOURCE=CSV", help="real patch tables")
    ap.add_argument("--demo", default=None, metavar="DIR", help="a finished demo run's folder (its --seed too)")
    ap.add_argument("--workers", default="1", help="comma-separated worker counts to run and compare (e.g. 1,2)")
    ap.add_argument("--tag", default="", help="writes bench_diagnosis_<tag>.json")
    a = ap.parse_args()

    from ctsma.diagnosis import compare_sources, train  # noqa: E402
    from ctsma.diagnosis import synthetic as syn  # noqa: E402

    if a.demo:
        from ctsma.demo.settings import DemoSettings
        from ctsma.demo.stages import Context, _analysable_labels, _oof_tables, diagnosis_folds
        ctx = Context(Path(a.demo).resolve(), DemoSettings(seed=a.seed))
        tables = _oof_tables(ctx)
        labels, _ = _analysable_labels(ctx, tables)
        a.folds = diagnosis_folds(ctx, labels)
        desc = f"demo run {a.demo} (seed {a.seed}): its out-of-fold tables and labels"
    elif a.tables:
        tables = dict(t.split("=", 1) for t in a.tables)
        import pandas as pd
        labels = pd.read_csv(a.labels)
        desc = f"tables {a.tables}"
    else:
        truth, labels = syn.synthetic_cohort(a.n, a.patches, seed=a.seed)
        tables = {"truth": truth, "mr_reference": syn.measured(truth, 0.3, seed=a.seed + 1),
                  "student_distilled": syn.measured(truth, 0.6, seed=a.seed + 2),
                  "student_baseline": syn.measured(truth, 1.2, seed=a.seed + 3)}
        desc = f"synthetic cohort n={a.n}, {a.patches} patches/ROI, seed {a.seed}"
    aggs = a.aggregators.split(",")
    import torch  # noqa: E402  (imported before timing)

    by_workers = {}
    for w in (int(x) for x in a.workers.split(",")):
        t0, c0 = time.perf_counter(), time.process_time()
        block, results = compare_sources(tables, labels, aggs, a.folds, a.seed, workers=w)
        by_workers[w] = {"wall_s": time.perf_counter() - t0, "cpu_s_this_process": time.process_time() - c0,
                         "block": block}
        print(f"{w} worker(s): {by_workers[w]['wall_s']:.1f} s wall", flush=True)
    ref = next(iter(by_workers.values()))["block"]
    def numbers(block):  # JSON text: NaN equals NaN
        return json.dumps({k: {m: v for m, v in block[k].items() if m != "seconds"} for k in block}, sort_keys=True,
                          default=float)

    same = all(numbers(b["block"]) == numbers(ref) for b in by_workers.values())
    cv_total, cv_cpu = by_workers[min(by_workers)]["wall_s"], by_workers[min(by_workers)]["cpu_s_this_process"]
    t1, c1 = time.perf_counter(), time.process_time()
    train(tables[next(iter(tables))], labels, "transformer", seed=a.seed, folds=None)
    train_s, train_cpu = time.perf_counter() - t1, time.process_time() - c1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    print(f"\n{desc}; {a.folds}-fold CV; load average {load}")
    print(f"{'source/aggregator':34s} {'AUC':>6s} {'95% CI':>15s} {'acc':>6s} {'sevMAE':>7s} {'sevR2':>6s} {'p vs base':>9s} {'s':>6s}")
    for k, m in block.items():
        p = m.get("p_auc_vs_student_baseline")
        print(f"{k:34s} {m['auc']:6.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] {m['accuracy']:6.3f} "
              f"{m['severity_mae']:7.3f} {m['severity_r2']:6.2f} {'' if p is None else f'{p:.3g}':>9s} {m['seconds']:6.1f}")
    print(f"all {len(block)} cross-validations: {cv_total:.1f} s wall, {cv_cpu:.1f} s CPU (the demo's diagnosis "
          f"stage's work); one transformer fit on all {len(labels)} knees: {train_s:.1f} s wall, {train_cpu:.1f} s CPU "
          f"(target <= 120 s). Training is single-threaded, so CPU time ~ wall time on an idle machine.")
    if len(by_workers) > 1:
        print("cross-validations by worker count: " + ", ".join(f"{w}: {v['wall_s']:.1f} s" for w, v in by_workers.items())
              + f"; results identical: {same}")
    res = {"description": desc, "folds": a.folds, "seed": a.seed, "load_average_1min": load,
           "cv_total_s": cv_total, "cv_total_cpu_s": cv_cpu,
           "cv_wall_s_by_workers": {w: v["wall_s"] for w, v in by_workers.items()}, "results_identical_across_workers": same,
           "cpu_count": os.cpu_count(),
           "train_transformer_all_s": train_s, "train_transformer_all_cpu_s": train_cpu, "diagnosis": block, "python": sys.version}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"bench_diagnosis{'_' + a.tag if a.tag else ''}.json").write_text(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":  # the guard that spawned workers (--workers) need
    main()
