"""``ctsma demo``: the whole method, end to end, on the embedded digital knee phantom."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="end-to-end demo on the digital knee phantom (cohort → reports)",
        description="Generate the phantom cohort, train synthesis and register all pairs, build the patch dataset, "
                    "train teacher, distilled and baseline students (patient-level cross-fitting), evaluate, train "
                    "and evaluate OA diagnosis, run CT-only inference on a held-out knee, and write metrics.json, "
                    "the study and patient reports and a Slicer scene. Finished stages are cached: a rerun resumes.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--n", type=int, help="knees in the cohort (default 36)")
    p.add_argument("--seed", type=int, help="cohort seed (default 0)")
    p.add_argument("--workers", type=int, help="parallel processes (default 2)")
    p.add_argument("--folds", type=int, help="cross-fitting folds for the CNNs (default 3)")
    p.add_argument("--config", type=Path, help="YAML/JSON file of demo settings (see docs/demo.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..demo import DemoSettings, run_demo
    from ..demo.run import print_summary
    from ..demo.stages import check_settings

    from .options import given, named_as_options

    over, names = given((("n", "--n", args.n), ("seed", "--seed", args.seed), ("workers", "--workers", args.workers),
                         ("folds", "--folds", args.folds)))
    with named_as_options(names):
        s = load_config(args.config, DemoSettings, overrides=over)
        check_settings(s)  # here too, so that its errors name --n, --folds as typed
    summaries = run_demo(args.out, s)
    print_summary(args.out, summaries)
    return 0
