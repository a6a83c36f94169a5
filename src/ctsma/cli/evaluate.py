"""``ctsma evaluate --config FILE --out DIR``: agreement of every regression source on held-out patients."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate teacher, students and CT morphometry on held-out patients")
    p.add_argument("--config", required=True, help="the training YAML (or shipped config name: demo, gpu) "
                   "used for 'ctsma train'")
    p.add_argument("--out", required=True, help="output folder (metrics.json, tables, plots)")
    p.add_argument("--store", default=None, help="patch store folder (overrides data.store)")
    p.add_argument("--models", default=None, help="run folder holding the model files (overrides output.dir)")
    p.add_argument("--no-ablations", action="store_true", help="skip the ablation variants of the config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import progress
    from ..evaluation.regression import evaluate
    from ..io import ensure_writable_dir
    from ..models.config import load_train_config
    from .train import overrides_from

    over = overrides_from(argparse_like(args))
    cfg = load_train_config(args.config, over)
    out = ensure_writable_dir(args.out)
    res = evaluate(cfg, out, ablations=not args.no_ablations)
    for s, block in res["regression"].items():
        m = block.get("mean_icc21")
        progress.info(f"{s}: mean ICC(2,1) {m:.3f}" if m is not None else f"{s}: mean ICC(2,1) n/a")
    g = res.get("distillation_gain")
    if g:
        progress.info(f"distillation gain {g['mean_icc21_diff']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]")
    progress.info(f"wrote {out / 'metrics.json'}")
    return 0


def argparse_like(args):
    import types
    return types.SimpleNamespace(set=args.set, store=args.store, out=args.models)
