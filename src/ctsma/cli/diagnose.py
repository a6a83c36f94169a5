"""``ctsma diagnose train|evaluate|predict``: patient-level OA diagnosis from patch parameters."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

AGG_CHOICES = ("transformer", "mlp", "logistic")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose", help="patient-level OA diagnosis (train, cross-validate, predict)",
        description="Patient-level knee OA diagnosis from patch-wise trabecular parameters. A patch table is a CSV "
                    "with columns subject, roi (MFC/LFC/MTP/LTP), rel_x, rel_y, rel_z (mm), BV/TV, Tb.Th, Tb.Sp, "
                    "Tb.N; labels are a CSV (e.g. the phantom's manifest.csv) with subject, oa (0/1) and severity.")
    sub = p.add_subparsers(dest="diagnose_command", metavar="ACTION", required=True)

    def common(q):
        q.add_argument("--labels", required=True, metavar="CSV", help="per-knee labels: subject, oa, severity")
        q.add_argument("--folds", type=int, default=5, help="patient-level cross-validation folds (default 5)")
        q.add_argument("--seed", type=int, default=0, help="random seed for folds and training (default 0)")
        q.add_argument("--workers", type=int, default=1, help="cross-validation folds trained in this many "
                       "parallel processes (default 1; the results are the same)")

    t = sub.add_parser("train", help="cross-validate, then train on all knees and save the model")
    t.add_argument("--patches", required=True, metavar="CSV", help="patch table")
    common(t)
    t.add_argument("--aggregator", choices=AGG_CHOICES, default="transformer")
    t.add_argument("--prefix", default="", help="read the parameters from the columns <PREFIX><param> (e.g. mr_)")
    t.add_argument("--source", default="", help="name of the parameter source, stored in the model (e.g. "
                                                "student_distilled)")
    t.add_argument("--no-cv", action="store_true", help="skip cross-validation (the model then reports no "
                                                        "performance)")
    t.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="cross-validate aggregators on one or more parameter sources")
    e.add_argument("--patches", required=True, action="append", metavar="[SOURCE=]CSV",
                   help="patch table, optionally named (e.g. student_distilled=distilled.csv); repeat for each "
                        "source")
    common(e)
    e.add_argument("--prefix", action="append", default=[], metavar="SOURCE=PREFIX",
                   help="read SOURCE's parameters from the columns <PREFIX><param>, e.g. mr_reference=mr_ or "
                        "truth=true_ for the patch store's patches.csv")
    e.add_argument("--aggregators", default="transformer,mlp,logistic",
                   help="comma-separated aggregators (default transformer,mlp,logistic)")
    e.add_argument("--compare", action="append", default=None, metavar="A:B",
                   help="sources whose AUCs get a paired DeLong test (default student_distilled:student_baseline)")
    e.add_argument("--out", required=True, metavar="DIR",
                   help="folder for metrics.json, diagnosis_table.md/.csv, roc_<aggregator>.png, oof_predictions.csv")
    e.set_defaults(func=_evaluate)

    r = sub.add_parser("predict", help="per-knee OA probability and severity with a trained model")
    r.add_argument("--model", required=True, metavar="MODEL")
    r.add_argument("--patches", required=True, metavar="CSV")
    r.add_argument("--prefix", default="", help="read the parameters from the columns <PREFIX><param>")
    r.add_argument("--out", metavar="CSV", default=None, help="also write the predictions to this CSV "
                                                             "(and a .json beside it)")
    r.set_defaults(func=_predict)


def _check_seed(args) -> None:
    if not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")


def _check_folds(args) -> None:
    if args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")


def _train(args) -> int:
    from .. import diagnosis
    from ..diagnosis.data import check_labels, use_parameter_columns
    from ..progress import info

    _check_seed(args)
    if not args.no_cv:
        _check_folds(args)
    from ..io import ensure_output_file
    ensure_output_file(args.out, (".safetensors",))  # before any work
    patches = use_parameter_columns(args.patches, args.prefix)
    _say_unlabelled("patch table", patches, check_labels(args.labels))
    model = diagnosis.train(patches, args.labels, args.aggregator, seed=args.seed,
                            folds=None if args.no_cv else args.folds, source=args.source, workers=args.workers)
    diagnosis.save(model, args.out)
    cv = model.cv_metrics
    if cv:
        info(f"{args.aggregator}: {_cv_line(cv)} (n={cv['n']})")
    info(f"model written to {args.out}")
    return 0


def _say_unlabelled(what: str, patches, labels) -> None:
    """Say how many subjects of a patch table have no label: they are left out of training and cross-validation,
    which a table of another cohort, or labels of a part of it, would otherwise pass without a word."""
    from ..progress import info

    have = set(patches["subject"].astype(str))
    left = sorted(have - set(labels.index.astype(str)))
    if left:
        info(f"{what}: {len(left)} of {len(have)} subject(s) have no label and are not used "
             f"({', '.join(left[:5])}{' …' if len(left) > 5 else ''})")


def _severity(m: dict) -> str:
    from ..report.format import as_float, fmt

    sev = as_float(m.get("severity_mae"))  # null in a model file's JSON, NaN: no severity labels
    return f"severity MAE {fmt(sev)}" if sev is not None else "no severity labels"


def _cv_line(cv: dict) -> str:
    """The cross-validated performance in words; a measure the model file holds as null (no severity labels:
    no severity MAE) is said so, not formatted."""
    from ..report.format import fmt

    ci = cv.get("auc_ci") or [None, None]
    return (f"cross-validated AUC {fmt(cv.get('auc'))} [{fmt(ci[0])}, {fmt(ci[1])}], "
            f"accuracy {fmt(cv.get('accuracy'))}, {_severity(cv)}")


def _parse_sources(items) -> dict:
    out = {}
    for i, item in enumerate(items):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = (Path(item).stem if len(items) > 1 else "input"), item
        if name in out:
            raise UserError(f"source name {name!r} is given twice in --patches")
        out[name] = path
    return out


FEW_KNEES = 20
"""Below this many labelled knees, ``diagnose evaluate`` warns that its AUCs are rough."""


def _evaluate(args) -> int:

    from .. import diagnosis
    from ..diagnosis import report
    from ..diagnosis.data import check_labels, read_table, use_parameter_columns
    from ..io import ensure_writable_dir
    from ..io.atomic import merge_json, remove_stale_outputs, remove_stale_partials
    from ..progress import info
    from ..report.format import fmt

    _check_seed(args)
    _check_folds(args)
    aggs = [a.strip() for a in args.aggregators.split(",") if a.strip()]
    bad = [a for a in aggs if a not in AGG_CHOICES]
    if bad or not aggs:
        raise UserError(f"unknown aggregator(s) {', '.join(bad) or '(none)'}; choose from {', '.join(AGG_CHOICES)}")
    pairs = []
    for c in args.compare or ["student_distilled:student_baseline"]:
        a, sep, b = c.partition(":")
        if not sep or not a or not b:
            raise UserError(f"--compare takes A:B (two source names), got {c!r}")
        pairs.append((a, b))
    sources = _parse_sources(args.patches)
    unknown = sorted({n for pair in pairs for n in pair} - set(sources)) if args.compare else []
    if unknown:
        raise UserError(f"--compare names {', '.join(unknown)}, which --patches does not give "
                        f"(sources: {', '.join(sources)})")
    prefixed = set()
    for item in args.prefix:
        name, sep, prefix = item.partition("=")
        if not sep or name not in sources:
            raise UserError(f"--prefix takes SOURCE=PREFIX for a source named in --patches, got {item!r}")
        if name in prefixed:  # the second would silently win; name the table twice to compare both columns
            raise UserError(f"--prefix gives source {name!r} more than one prefix; give its table once per prefix, "
                            f"e.g. --patches mr=patches.csv --prefix mr=mr_ --patches truth=patches.csv "
                            f"--prefix truth=true_")
        prefixed.add(name)
        sources[name] = use_parameter_columns(sources[name], prefix, what=f"patch table of {name}")
    out = ensure_writable_dir(args.out)
    lab = check_labels(args.labels)
    for name, table in sources.items():
        sources[name] = read_table(table, f"patch table of {name}")  # read once, here (a path, or prefixed)
        _say_unlabelled(f"patch table of {name}", sources[name], lab)
    tabled = set.intersection(*(set(t["subject"].astype(str)) for t in sources.values()))
    used = lab[lab.index.isin(tabled)]  # a labelled knee without rows in every table is left out (compare_sources)
    n, smaller = len(used), int(min((used["oa"] == 1).sum(), (used["oa"] == 0).sum()))
    if n < FEW_KNEES:
        import warnings

        # a knee of the smaller class moved from one end of the ranking to the other moves the AUC by 1/its count
        warnings.warn(f"only {n} labelled knees: AUCs and their CIs from so few are rough (one knee moves an AUC "
                      f"by up to {1 / max(1, smaller):.2f}); take them as indicative", stacklevel=2)
    block, results = diagnosis.compare_sources(sources, args.labels, aggs, args.folds, args.seed, pairs=pairs,
                                               workers=args.workers)
    # A run stopped while it writes (SIGKILL, a full disk) must not leave an earlier run's diagnosis block in
    # metrics.json beside this run's table, or this run's block beside the earlier run's out-of-fold predictions and
    # figures (which `ctsma report study` reads with it): the earlier block goes first, the new one comes last, once
    # the files it describes are in place. Other commands' blocks (`ctsma evaluate`'s) stay throughout.
    metrics = out / "metrics.json"
    if metrics.is_file():
        merge_json(metrics, {}, drop=("diagnosis", "diagnosis_settings"))
    for name in ("diagnosis_table.md", "diagnosis_table.csv", "oof_predictions.csv",
                 *(f"roc_{a}.png" for a in AGG_CHOICES)):
        remove_stale_partials(out / name)  # the temporary files of a killed run's writes
    report.write_table(block, out)
    rocs = report.write_roc_plots(results, out)
    # an earlier run's curves of aggregators not run now would sit beside tables that no longer hold them
    remove_stale_outputs(out, [f"roc_{a}.png" for a in AGG_CHOICES], [p.name for p in rocs])
    report.write_oof(results, out / "oof_predictions.csv")
    merge_json(metrics, {"diagnosis": block, "diagnosis_settings": {  # evaluate's blocks stay
        "folds": args.folds, "seed": args.seed, "aggregators": {a: diagnosis.DEFAULTS[a] for a in aggs},
        "compare": [f"{a}:{b}" for a, b in pairs]}})
    for key, m in block.items():
        info(f"{key}: AUC {m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}], F1 {fmt(m['f1'])}, "
             f"{_severity(m)}" +
             "".join(f", p vs {k[9:]} {v:.3g}" for k, v in m.items() if k.startswith("p_auc_vs_")))
    info(f"results written to {out} (metrics.json, diagnosis_table.md, roc_*.png)")
    return 0


def _predict(args) -> int:
    from .. import diagnosis
    from ..io import atomic_path, ensure_output_file, write_json

    from ..diagnosis.data import use_parameter_columns

    if args.out:  # the table; its JSON twin goes beside it as <name>.json
        ensure_output_file(args.out, (".csv",))
        ensure_output_file(Path(args.out).with_suffix(".json"))
    model = diagnosis.load(args.model)
    table = use_parameter_columns(args.patches, args.prefix)  # a table with no rows is refused as it is read
    df = diagnosis.predict(model, table)
    cols = ["subject", "n_patches", "oa_probability", "severity", "message"]
    cv = model.cv_metrics
    perf = (f"model: {model.metadata.get('aggregator')} trained on {model.metadata.get('n_train')} knees"
            + (f"; {_cv_line(cv)}" if cv else "; no cross-validated performance recorded"))
    print(perf)
    print(df[cols].to_string(index=False, na_rep="–", float_format=lambda v: f"{v:.3f}"))
    none = df.loc[df["oa_probability"].isna(), "subject"].tolist()
    if none:  # each knee keeps its row and says why in 'message'; the others' probabilities stand
        import warnings

        warnings.warn(f"{len(none)} of {len(df)} knee(s) got no OA probability ({', '.join(none[:5])}"
                      f"{' …' if len(none) > 5 else ''}): see their message", stacklevel=2)
    if args.out:
        with atomic_path(args.out) as tmp:
            df.to_csv(tmp, index=False, na_rep="")
        write_json(Path(args.out).with_suffix(".json"), {"model_performance": cv, "model": {
            k: model.metadata.get(k) for k in ("aggregator", "source", "n_train", "seed", "cv_description")},
            "predictions": df.to_dict(orient="records")})
    return 0
