"""``ctsma synthesis train|apply|evaluate``: the MR→pseudo-CT model."""

from __future__ import annotations

import argparse
import warnings

from ..errors import UserError


def _rows(args):
    from ..registration.cohort import read_manifest

    df = read_manifest(args.manifest)
    everyone = set(df.subject)
    if args.subjects:
        wanted = [s.strip() for s in args.subjects.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(df.subject))
        if unknown:
            raise UserError(f"subjects not in the manifest: {', '.join(unknown)}")
        df = df[df.subject.isin(wanted)]
    if args.exclude:
        drop = [s.strip() for s in args.exclude.split(",") if s.strip()]
        unknown = sorted(set(drop) - everyone)
        if unknown:  # a typo would keep a held-out knee in
            raise UserError(f"--exclude: subjects not in the manifest: {', '.join(unknown)}")
        df = df[~df.subject.isin(drop)]
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be at least 1 (got {args.limit})")
        df = df.iloc[: args.limit]
    if not len(df):
        raise UserError("no pairs selected from the manifest")
    return df


def train_cmd(args: argparse.Namespace) -> int:
    from ..io.images import read_image
    from ..progress import info
    from ..registration.masks import read_bone_labels
    from ..synthesis.training import load_train_config, train

    from .options import given, named_as_options

    overrides, names = given((("max_minutes", "--max-minutes", args.max_minutes),
                              ("threads", "--threads", args.threads or None)))
    with named_as_options(names):
        cfg = load_train_config(args.preset, overrides)
    from ..io.atomic import ensure_output_file
    ensure_output_file(args.out, (".safetensors",))  # before any work
    df = _rows(args)
    pairs = []
    for r in df.to_dict("records"):
        ct = read_image(r["ct"], what="CT")
        bones = read_bone_labels(r["ct_bones"], ct) if r.get("ct_bones") else None
        pairs.append((read_image(r["mr"], what="MR"), ct, bones))
    model = train(pairs, cfg, names=list(df.subject))
    model.save(args.out)
    t = model.meta["training"]["timings"]
    info(f"trained on {len(pairs)} pairs in {t['total_s']:.0f} s; model written to {args.out}")
    return 0


def apply_cmd(args: argparse.Namespace) -> int:
    from ..io.atomic import ensure_output_file
    from ..io.images import IMAGE_SUFFIXES, read_image, write_image
    from ..synthesis.model import SynthesisModel

    from ..registration.pipeline import check_mr_intensities

    from ..progress import info

    ensure_output_file(args.out, IMAGE_SUFFIXES)  # before any work
    model = SynthesisModel.load(args.model)
    mr = read_image(args.mr, what="MR")
    check_mr_intensities(mr, "synthesis makes a pseudo-CT from an MR (bone dark), not from a CT", f"MR {args.mr}")
    info(f"synthesising a pseudo-CT of {' x '.join(map(str, mr.GetSize()))} voxels ...")
    write_image(model.apply(mr), args.out)
    info(f"pseudo-CT written to {args.out}")
    return 0


def evaluate_cmd(args: argparse.Namespace) -> int:
    from ..io.atomic import ensure_output_file, write_json
    from ..progress import info
    from ..synthesis.model import SynthesisModel
    from ..synthesis.quality import evaluate_manifest

    ensure_output_file(args.out, (".json",))  # before any work
    model = SynthesisModel.load(args.model)
    rows = _rows(args)
    seen = sorted(set(rows.subject) & set((getattr(model, "meta", {}) or {}).get("training", {}).get("subjects", [])))
    if seen:
        warnings.warn(f"{len(seen)} of the {len(rows)} pairs evaluated trained this model ({', '.join(seen[:6])}"
                      f"{', ...' if len(seen) > 6 else ''}): their errors are not held-out figures; use --exclude",
                      stacklevel=1)
    res = evaluate_manifest(rows, model)
    write_json(args.out, res)
    s = res["summary"]
    info(f"HU MAE bone {s['mae_bone_hu']:.1f}, soft tissue {s['mae_soft_hu']:.1f}, SSIM {s['ssim']:.3f} "
         f"over {s['n']} pairs; written to {args.out}")
    return 0


def _selection(p) -> None:
    p.add_argument("--manifest", required=True, help="cohort CSV with columns mr, ct (and subject, ct_bones)")
    p.add_argument("--subjects", help="comma-separated subjects to use (default: all)")
    p.add_argument("--exclude", help="comma-separated subjects to leave out (e.g. held-out test knees)")
    p.add_argument("--limit", type=int, help="use at most this many pairs")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("synthesis", help="MR→pseudo-CT model: train, apply, evaluate",
                              description="A 2.5D U-Net that turns BFFE MR into a pseudo-CT (HU), trained by weak "
                                          "pairing (no ground-truth transforms); see docs/registration.md.")
    sub = p.add_subparsers(dest="synthesis_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a model on a cohort manifest (pairs are aligned without ground truth)")
    _selection(t)
    t.add_argument("--out", required=True, help="model file to write (.safetensors)")
    t.add_argument("--preset", default="default", help="training preset (default, demo) or a YAML/JSON file")
    t.add_argument("--max-minutes", type=float, help="time limit for training (stops early)")
    t.add_argument("--threads", type=int, default=0, help="torch threads, and pairing registrations run side by side "
                                                          "(each on one ITK thread); 0: the cores, at most 4")
    t.set_defaults(func=train_cmd)
    a = sub.add_parser("apply", help="pseudo-CT of one MR")
    a.add_argument("mr", help="MR image")
    a.add_argument("--model", required=True, help="synthesis model file")
    a.add_argument("--out", required=True, help="pseudo-CT image to write (HU, MR frame, model's working grid)")
    a.set_defaults(func=apply_cmd)
    e = sub.add_parser("evaluate", help="HU MAE (bone, soft tissue) and SSIM against the phantom's truth")
    _selection(e)
    e.add_argument("--model", required=True, help="synthesis model file")
    e.add_argument("--out", required=True, help="JSON file to write")
    e.set_defaults(func=evaluate_cmd)
