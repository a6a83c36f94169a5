"""``ctsma crossfit --config FILE --store STORE --out DIR``: patient-level cross-fitting of the teacher and both
students, and their evaluation with every patient predicted by the models of the fold that held it out.

It runs the demo's training and evaluation stages (``ctsma.demo.crossfit``) on a patch store of your own: the one
way this project cross-fits, so the figures of a cohort and of the demo are computed alike (docs/training.md).
"""

from __future__ import annotations

_FOLDS = "give the number of patient folds with --folds"
SET_BY_CROSSFIT = {("data", "k_folds"): _FOLDS, ("data", "fold"): _FOLDS, ("data", "use_stored_split"): _FOLDS,
                   ("data", "split_seed"): "use --seed (the folds, the training and the bootstrap)",
                   ("trainer", "seed"): "use --seed (the folds, the training and the bootstrap)",
                   ("data", "store"): "use --store", ("output", "dir"): "use --out"}
"""The settings that the cross-fitting sets in each fold's config (``demo.stages.fold_config``), and the option that
gives them instead."""


def add_parser(sub) -> None:
    p = sub.add_parser("crossfit", help="train teacher and students on K patient folds and evaluate every patient "
                                        "out of fold")
    p.add_argument("--config", required=True, help="training YAML with its evaluate section, or a shipped config "
                   "by name: demo (CPU-sized), gpu (wider networks)")
    p.add_argument("--store", required=True, help="patch store folder ('ctsma dataset build' output)")
    p.add_argument("--out", required=True, help="run folder: config.yaml (the settings used), training/fold<f>/ "
                   "(the fold's three models), evaluation/ (metrics.json, tables, predictions of every patch, plots)")
    p.add_argument("--folds", type=int, default=3, help="patient folds K (default 3): fold f's models learn from "
                   "the other folds' patients and predict fold f's")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, the training and the bootstrap "
                   "(default 0; it replaces the config's trainer.seed)")
    p.add_argument("--workers", type=int, default=2, help="on a CPU, folds trained side by side in processes "
                   "(up to 2 x workers; default 2); with a GPU the trainings run one after the other")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the config, e.g. --set optim.max_epochs=20")
    p.set_defaults(func=run)


def run(args) -> int:
    import types
    from pathlib import Path

    from .. import progress
    from ..demo.crossfit import crossfit
    from ..errors import UserError
    from ..models.config import load_train_config
    from .train import overrides_from

    if not 2 <= args.folds <= 20:
        raise UserError(f"--folds must be 2 to 20, not {args.folds}")
    if not 1 <= args.workers <= 256:
        raise UserError(f"--workers must be 1 to 256, not {args.workers}")
    if not 0 <= args.seed < 2**31:
        raise UserError(f"--seed must be 0 to 2147483647, not {args.seed}")
    over = overrides_from(types.SimpleNamespace(set=args.set))
    for section, key in SET_BY_CROSSFIT:  # it would be replaced for every fold, silently, yet kept in config.yaml
        given = over.get(section)  # (a section given a value, not a mapping: the config refuses it below)
        if isinstance(given, dict) and key in given:
            raise UserError(f"--set {section}.{key}: 'ctsma crossfit' sets it for every fold; "
                            f"{SET_BY_CROSSFIT[section, key]}")
    cfg = load_train_config(args.config, over)
    res = crossfit(cfg, args.store, args.out, folds=args.folds, seed=args.seed, workers=args.workers)
    for source, mean in res["mean_icc21"].items():
        progress.info(f"{source}: mean ICC(2,1) " + (f"{mean:.3f}" if mean is not None else "n/a"))
    lo, hi = res["gain_ci"]
    progress.info(f"distillation gain {res['distillation_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    progress.info(f"wrote {Path(args.out) / 'evaluation' / 'metrics.json'}")
    return 0
