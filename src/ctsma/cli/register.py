"""``ctsma register MR CT --out DIR`` and cohort mode ``ctsma register --manifest CSV --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError


def _model_path(args, preset) -> str | None:
    if not preset.use_synthesis:
        return None
    if args.model:
        return args.model
    from ..resources import resource_path

    shipped = resource_path("Models", "synthesis.safetensors", must_exist=False)
    if shipped.is_file():
        from ..progress import info

        info("synthesis model: the shipped one, trained on 6 phantom knees; for your own MR and CT protocol train "
             "one with 'ctsma synthesis train' and give it with --model")
        return str(shipped)
    raise UserError(f"preset '{preset.name}' registers a pseudo-CT: give a synthesis model with --model "
                    "(train one with 'ctsma synthesis train'), or use --preset nosynth")


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import ensure_writable_dir
    from ..progress import info, step
    from ..registration.presets import load_preset

    for flag, value in (("--jobs", args.jobs), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    # an option of the other mode would be silently ignored: refuse it instead
    if args.manifest:
        given = [f for f, v in (("--ct-bones", args.ct_bones), ("--mr-bones", args.mr_bones)) if v]
        if given:
            raise UserError(f"{' and '.join(given)} apply to one pair; with --manifest give each subject's labels "
                            "in the manifest's ct_bones / mr_bones columns")
    else:
        given = [f for f, v in (("--shard", args.shard), ("--limit", args.limit)) if v is not None] \
            + (["--jobs"] if args.jobs != 1 else [])
        if given:
            raise UserError(f"{', '.join(given)} apply to cohort mode only (--manifest CSV)")
    from .options import named_as_options

    with named_as_options({"threads": "--threads"} if args.threads else {}):
        preset = load_preset(args.preset, {"threads": args.threads} if args.threads else None)
    model_path = _model_path(args, preset)
    out = ensure_writable_dir(args.out)
    if args.manifest:
        if args.mr or args.ct:
            raise UserError("give either MR and CT images, or --manifest, not both")
        from ..registration.cohort import QA_FAILED, parse_shard, run_cohort

        shard = parse_shard(args.shard)
        summary = run_cohort(args.manifest, out, preset=preset, model_path=model_path,
                             shard=shard, jobs=args.jobs, limit=args.limit)
        failed = summary[summary.status.isin(["failed", QA_FAILED])]
        info(f"registered {int((summary.status == 'done').sum())}, skipped "
             f"{int(summary.status.str.startswith('skipped').sum())}, failed {len(failed)}; summary in "
             f"{out / f'cohort_{shard[0]}of{shard[1]}.csv'}")
        for _, r in failed.iterrows():  # not status lines: shown with --quiet too
            print(f"error: {r.subject}: {r.error}", file=sys.stderr)
        return 1 if len(failed) else 0
    if not (args.mr and args.ct):
        raise UserError("give the MR and the CT images (ctsma register MR CT --out DIR), or --manifest CSV")
    from ..registration.cohort import register_files
    from ..registration.pipeline import STAGE_ORDER
    from ..synthesis.model import SynthesisModel

    model = SynthesisModel.load(model_path) if model_path else None
    stages = [n for n in STAGE_ORDER if getattr(preset, n).enabled]
    done = []

    def stage_line(rec) -> None:  # a stage may take minutes on a clinical CT: a line (and an event) as each ends
        done.append(rec.name)
        dice = rec.bone_dice.get("mean") if rec.bone_dice else None
        step("register", len(done), len(stages),
             f"  {rec.name:<11} {rec.metric:<12} {rec.metric_before:.4g} -> {rec.metric_after:.4g} "
             f"{'kept' if rec.kept else 'REJECTED'}  dice {'-' if dice is None else round(dice, 3)}  "
             f"{rec.seconds:.1f} s")
    qa = register_files(args.mr, args.ct, out, preset=preset, model=model, ct_bones_path=args.ct_bones,
                        mr_bones_path=args.mr_bones, report=stage_line, model_path=model_path)
    info(f"registered in {qa['total_seconds']:.1f} s; outputs in {Path(out)}")
    if qa.get("qa_problem"):
        from ..registration.qa import EXIT_QA_FAILED
        print(f"error: {qa['qa_problem']}: the pair is not usable (see the warning above)", file=sys.stderr)
        return EXIT_QA_FAILED
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "register", help="multi-stage MR→CT registration (synthesis-based), one pair or a cohort",
        description="Register an MR (moving) to a CT (fixed) through the MR's pseudo-CT: initialisation, global "
                    "rigid, affine, per-bone rigid, constrained B-spline (stages chosen by a preset). Writes "
                    "DIR/transform_ct_to_mr.h5, mr_in_ct.nii.gz, pseudo_ct_in_ct.nii.gz, qa.json and checkerboards.")
    p.add_argument("mr", nargs="?", help="MR image (NIfTI/NRRD/MHA or DICOM folder)")
    p.add_argument("ct", nargs="?", help="CT image in Hounsfield units")
    p.add_argument("--out", required=True, help="output folder (cohort mode: one sub-folder per subject)")
    p.add_argument("--preset", default="default",
                   help="preset name (default, demo, nosynth, ...) or a JSON file (default: %(default)s)")
    p.add_argument("--model", help="synthesis model file (from 'ctsma synthesis train')")
    p.add_argument("--ct-bones", help="CT bone labels (femur=1, tibia=2); automatic segmentation without it")
    p.add_argument("--mr-bones", help="MR bone labels, only for an exact bone Dice in the QA")
    p.add_argument("--manifest", help="cohort mode: CSV with columns mr, ct (and subject, ct_bones, mr_bones)")
    p.add_argument("--shard", help="cohort mode: i/N, register rows i, i+N, ... (0 <= i < N)")
    p.add_argument("--jobs", type=int, default=1, help="cohort mode: pairs registered in parallel")
    p.add_argument("--limit", type=int, default=None, help="cohort mode: at most this many pairs of the shard")
    p.add_argument("--threads", type=int, default=0, help="ITK threads per registration (0: all cores)")
    p.set_defaults(func=run)
