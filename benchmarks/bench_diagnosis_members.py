"""One Transformer against an ensemble of three, folds fixed, only the initialisation varied.

    .venv/bin/python benchmarks/bench_diagnosis_members.py [--demo DIR ...] [--synthetic] [--inits 9]

For each cohort and source, the 5-fold patient-level cross-validation of the diagnosis is repeated with ``--inits``
initialisations (fold k of initialisation j trains with seed ``seed + k + 1000 j``, the seeds of ensemble member j),
the folds staying those of the cohort's seed. Reported: the AUC of every single network's out-of-fold
probabilities, and the AUC of the mean probability of consecutive triples (initialisations 0-2, 3-5, ...). The
first triple is exactly what ``members: 3`` predicts; the others are ensembles of the same kind with other seeds. This is how the default ``members: 3`` was chosen, on development
cohorts only:

* ``--demo DIR``: a ``ctsma demo`` output folder (its out-of-fold student parameters and the phantom labels), e.g.
  the seed-1 cohort; never the README's cohort for a decision. A ``bench_crossfit.py --labels`` work folder works
  too, with ``--seed`` (the cohort seed its folds used);
* ``--synthetic``: ``ctsma.diagnosis.synthetic`` cohorts of 36 knees, cohort seeds 11-13, noise 0.5 and 1.0.

Writes benchmarks/results/bench_diagnosis_members.json.
"""

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ap = argparse.ArgumentParser()
ap.add_argument("--demo", nargs="*", default=[], help="ctsma demo output folders")
ap.add_argument("--synthetic", action="store_true")
ap.add_argument("--inits", type=int, default=9, help="initialisations per source (a multiple of 3)")
ap.add_argument("--aggregator", default="transformer")
ap.add_argument("--seed", type=int, default=None,
                help="cohort seed of --demo folders without a metrics.json (a bench_crossfit.py --labels work folder)")
ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_diagnosis_members.json"))
a = ap.parse_args()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ctsma.diagnosis import build_kneeset, make_aggregator  # noqa: E402
from ctsma.diagnosis.evaluation import fold_assignment  # noqa: E402
from ctsma.diagnosis.synthetic import measured, synthetic_cohort  # noqa: E402
from ctsma.stats import auc_delong  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")
FOLDS = 5


def demo_tables(root: Path) -> tuple[dict, pd.DataFrame, int]:
    """The two students' out-of-fold patch tables and the labels, exactly as the demo's diagnosis stage reads them."""
    from ctsma.demo.settings import DemoSettings
    from ctsma.demo.stages import Context, _labels, _oof_tables

    if (root / "metrics.json").is_file():
        seed = int(json.loads((root / "metrics.json").read_text())["demo"]["settings"]["seed"])
    elif a.seed is not None:
        seed = a.seed
    else:
        sys.exit(f"{root} has no metrics.json (not a finished ctsma demo folder): give its cohort seed with --seed")
    ctx = Context(root, DemoSettings(seed=seed))
    tables = _oof_tables(ctx)
    return {k: tables[k] for k in ("student_distilled", "student_baseline")}, _labels(ctx), seed


def study(table, labels, seed: int) -> dict:
    knees = build_kneeset(table, labels)
    assign = fold_assignment(knees, FOLDS, seed)
    probs = []
    for j in range(a.inits):
        prob = np.full(len(knees), np.nan)
        for k in range(FOLDS):
            tr, te = np.flatnonzero(assign != k), np.flatnonzero(assign == k)
            m = make_aggregator(a.aggregator, {"members": 1}).fit(knees.subset(tr), seed=seed + k + 1000 * j)
            prob[te], _ = m.predict(knees.subset(te))
        probs.append(prob)
    single = [float(auc_delong(knees.oa, p).auc) for p in probs]
    ens = [float(auc_delong(knees.oa, np.mean(probs[i:i + 3], axis=0)).auc) for i in range(0, a.inits - 2, 3)]
    return {"single": single, "ensemble3": ens, "mean_single": float(np.mean(single)),
            "mean_ensemble3": float(np.mean(ens)), "n_knees": int(len(knees))}


results = []
t0 = time.time()
for root in a.demo:
    tables, labels, seed = demo_tables(Path(root))
    for src, t in tables.items():
        r = {"cohort": str(root), "seed": seed, "source": src, **study(t, labels, seed)}
        results.append(r)
        print(f"{root} {src}: single {r['mean_single']:.3f} (range {min(r['single']):.3f}-{max(r['single']):.3f}), "
              f"ensemble of 3 {r['mean_ensemble3']:.3f}", flush=True)
if a.synthetic:
    for cseed in (11, 12, 13):
        for noise in (0.5, 1.0):
            true, labels = synthetic_cohort(36, 12, seed=cseed)
            r = {"cohort": f"synthetic seed {cseed}", "seed": cseed, "source": f"noise {noise}",
                 **study(measured(true, noise, seed=cseed + 100), labels, cseed)}
            results.append(r)
            print(f"synthetic {cseed} noise {noise}: single {r['mean_single']:.3f}, "
                  f"ensemble of 3 {r['mean_ensemble3']:.3f}", flush=True)
out = {"aggregator": a.aggregator, "inits": a.inits, "folds": FOLDS, "seconds": time.time() - t0,
       "results": results}
Path(a.out).write_text(json.dumps(out, indent=1))
print(f"wrote {a.out}", file=sys.stderr)
