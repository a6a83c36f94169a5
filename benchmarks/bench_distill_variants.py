"""A distillation variant on a finished demo run: only the distilled students are retrained, the run's teachers and
baselines are reused, and the demo's evaluation is run on the result.

    .venv/bin/python benchmarks/bench_distill_variants.py --demo DEMO_DIR --tag NAME [--set KEY=VALUE ...]
                     [--retrain-teacher] [--work DIR]

``DEMO_DIR`` is the output folder of ``ctsma demo`` (its seed is read from its metrics.json). The training config is
the demo's with the ``--set`` overrides (as ``ctsma train --set``), so ``--set distill.loss=attention`` measures
attention transfer against the same baseline and folds. ``--retrain-teacher`` also retrains each fold's teacher with
the overrides first (e.g. ``--set teacher_net.input_pool=2``: a teacher that reads its MR at the CT's voxel).
The three folds train side by side, one torch thread each, as the demo does on a machine of up to five cores (where
it gives each of its three lanes one thread). There, with no overrides, the run reproduces the demo's distilled
student bit for bit (checked on the seed-1 cohort: 0.7133). Prints the mean ICC(2,1) of every
source and the distillation gain, and writes ``benchmarks/results/bench_distill_variants_<tag>.json``.
Figures: docs/training.md, *Distillation settings under the current training*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ap = argparse.ArgumentParser()
ap.add_argument("--demo", required=True, help="output folder of 'ctsma demo'")
ap.add_argument("--tag", required=True)
ap.add_argument("--set", action="append", default=[], help="KEY.SUB=VALUE override of the demo's training config")
ap.add_argument("--retrain-teacher", action="store_true", help="retrain the teachers with the overrides too")
ap.add_argument("--work", default="/tmp/ctsma_bench_distill_variants")
ap.add_argument("--results", default=str(Path(__file__).parent / "results"))


def _fold(cfg, teacher: bool) -> float:
    """One fold's (teacher and) distilled student, in a worker process with one torch thread."""
    from ctsma.models.train import train

    cfg.trainer.threads = 1
    t = time.perf_counter()
    if teacher:
        train("teacher", cfg)
    train("student", cfg)
    return time.perf_counter() - t


def main(a) -> None:
    from ctsma.cli.train import overrides_from
    from ctsma.config import to_dict
    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings
    from ctsma.errors import ConfigError
    from ctsma.models import load_train_config
    from ctsma.processes import run_jobs

    keys = [item.partition("=")[0].strip() for item in a.set]
    if any(k.startswith("teacher_net.") for k in keys) and not a.retrain_teacher:
        sys.exit("--set teacher_net.* changes the teacher: add --retrain-teacher (else the demo's teacher is used)")
    shared = [k for k in keys if k.startswith(("data.", "student_net.", "optim.", "trainer."))]
    if shared:
        print(f"note: {', '.join(shared)} also differ from the demo's baseline, which is reused as it is: the gain "
              "then compares students trained with other settings", file=sys.stderr)
    demo, work = Path(a.demo), Path(a.work)
    if not (demo / "metrics.json").is_file() or not (demo / "training" / "fold0").is_dir():
        sys.exit(f"{demo} is not a finished 'ctsma demo' output folder")
    settings = json.loads((demo / "metrics.json").read_text())["demo"]["settings"]
    if settings.get("train_config", "demo") != "demo":
        sys.exit(f"{demo} was trained with the config {settings['train_config']!r}; this benchmark varies the demo's")
    seed, n_folds = int(settings["seed"]), int(settings["folds"])
    folds = [demo / "training" / f"fold{f}" for f in range(n_folds)]
    try:
        cfg = to_dict(load_train_config(stages.train_config_path(DemoSettings(train_config="demo")),
                                        overrides_from(SimpleNamespace(set=a.set))))
    except ConfigError as e:
        sys.exit(str(e))
    cfg.pop("base_dir")
    if work.exists():
        shutil.rmtree(work)
    (work / "dataset").mkdir(parents=True)
    (work / "dataset" / "store").symlink_to((demo / "dataset" / "store").resolve())
    (work / "phantom").mkdir()
    shutil.copy(demo / "phantom" / "manifest.csv", work / "phantom" / "manifest.csv")
    import yaml

    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ctx = stages.Context(work, DemoSettings(folds=len(folds), seed=seed, train_config=str(work / "config.yaml")))
    kept = ("student_baseline",) if a.retrain_teacher else ("teacher", "student_baseline")
    for f, src in enumerate(folds):
        dst = work / "training" / f"fold{f}"
        dst.mkdir(parents=True)
        for name in kept:
            shutil.copy(src / f"{name}.safetensors", dst)
    t = time.perf_counter()
    run_jobs(_fold, [(stages.fold_config(ctx, f), a.retrain_teacher) for f in range(len(folds))], len(folds))
    secs = time.perf_counter() - t
    (work / "evaluation").mkdir()
    stages.evaluation(ctx, work / "evaluation")
    m = json.loads((work / "evaluation" / "metrics.json").read_text())
    res = {"demo": str(demo), "seed": seed, "set": a.set, "retrain_teacher": a.retrain_teacher,
           "train_seconds": round(secs, 1),
           "mean_icc21": {s: b["mean_icc21"] for s, b in m["regression"].items()},
           "icc21": {s: {p: b[p]["icc21"] for p in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")}
                     for s, b in m["regression"].items()},
           "distillation_gain": m["distillation_gain"], "distillation_gain_vs_truth": m.get("distillation_gain_vs_truth")}
    out = Path(a.results) / f"bench_distill_variants_{a.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    g = res["distillation_gain"]
    print(" / ".join(f"{s} {v:.4f}" for s, v in res["mean_icc21"].items()),
          f"| gain {g['mean_icc21_diff']:+.4f} [{g['ci'][0]:+.4f}, {g['ci'][1]:+.4f}] | training {secs:.0f} s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(ap.parse_args())
