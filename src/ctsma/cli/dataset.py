"""``ctsma dataset build --manifest M --out DIR``: paired CT/MR patch dataset of a cohort (see docs/dataset.md)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("dataset", help="build the paired CT/MR patch dataset of a cohort")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    b = dsub.add_parser("build", help="cut CT and MR patches in the ROIs, with MR (and true) parameters")
    b.add_argument("--manifest", required=True, help="cohort manifest.csv (subject, side, ct, mr, ...)")
    b.add_argument("--out", required=True, help="output folder (patch store); a rerun resumes")
    b.add_argument("--registrations", default=None,
                   help="folder with one 'ctsma register' output folder per subject (the default transform source)")
    b.add_argument("--transform-column", default=None,
                   help="use this manifest column's transform file instead (e.g. transform_ct_to_mr on the phantom)")
    b.add_argument("--config", default=None, help="YAML/JSON build settings (see docs/dataset.md)")
    b.add_argument("--stride-mm", type=float, default=None, help="patch-centre grid spacing in the ROIs (4)")
    b.add_argument("--max-per-roi", type=int, default=None, help="most patches per ROI and subject (16)")
    b.add_argument("--extent-mm", type=float, default=None, help="patch edge in mm (8)")
    b.add_argument("--folds", type=int, default=None, help="patient-level folds (5)")
    b.add_argument("--seed", type=int, default=None, help="random seed (0)")
    b.add_argument("--rois", choices=("manifest", "auto"), default=None,
                   help="ROIs from the manifest's ct_rois column (default) or always automatic")
    b.add_argument("--no-truth", action="store_true", help="skip the phantom's true parameters (the truth patches "
                   "and the manifest's true_<ROI>_<param> values)")
    b.add_argument("--subjects", nargs="*", default=None, help="only these subjects (P1 P2 or P1,P2)")
    b.add_argument("--workers", type=int, default=1, help="subjects built in parallel processes (default 1)")
    b.add_argument("--ct-edge-sigma-mm", type=float, default=None, metavar="MM",
                   help="blur every CT in-plane to this edge sigma before cutting patches (0: as they are; see "
                        "docs/dataset.md)")
    b.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    from .. import progress
    from ..config import load_config
    from ..dataset.build import BuildSettings, build_dataset
    from ..errors import UserError
    from .options import given, named_as_options

    over, names = given((("stride_mm", "--stride-mm", args.stride_mm),
                         ("max_per_roi", "--max-per-roi", args.max_per_roi),
                         ("extent_mm", "--extent-mm", args.extent_mm), ("folds", "--folds", args.folds),
                         ("seed", "--seed", args.seed), ("roi_source", "--rois", args.rois),
                         ("transform_column", "--transform-column", args.transform_column),
                         ("ct_edge_sigma_mm", "--ct-edge-sigma-mm", args.ct_edge_sigma_mm)))
    if args.no_truth:
        over["truth"] = False
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    with named_as_options(names):
        s = load_config(args.config, BuildSettings, overrides=over)
    subjects = None
    if args.subjects is not None:  # "P1 P2" or "P1,P2", as 'ctsma synthesis --subjects' takes them
        subjects = [name.strip() for a in args.subjects for name in a.split(",") if name.strip()]
        if not subjects:
            raise UserError("--subjects needs subject names (P1 P2 or P1,P2); leave it out to build every subject")
    summary = build_dataset(args.manifest, args.out, s, registrations=args.registrations, subjects=subjects,
                            workers=args.workers)
    progress.info(f"{summary['n_patches']} patches from {summary['n_subjects']} subjects in {args.out}"
                  + (f"; excluded {len(summary['excluded'])}: " + ", ".join(summary["excluded"])
                     if summary["excluded"] else ""))
    return 0
