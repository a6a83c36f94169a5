"""``ctsma infer``: parameter maps, ROI tables and diagnosis from a knee CT alone."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "infer", help="parameter maps and ROI tables from a knee CT (CT only)",
        description="Analyse a knee CT (NIfTI, NRRD, MHA or a DICOM series folder): bone segmentation, "
                    "subchondral ROIs, sliding-window student predictions, parameter and uncertainty maps, "
                    "ROI table and, where a diagnosis model exists, the OA probability. A CSV manifest (column "
                    "'ct', optional 'subject', 'ct_bones', 'side' (L/R), 'slice_thickness' (mm)) or a folder of CT "
                    "files runs in batch mode. Over the "
                    "memory budget (CTSMA_MEMORY_GB) the maps are made and written in z-slabs, with the same results.")
    p.add_argument("ct", type=Path, help="CT image, DICOM folder, folder of CTs, or manifest .csv")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--segmentation", type=Path, help="bone label image (femur=1, tibia=2, ...) replacing the "
                   "automatic segmentation; a .seg.nrrd with named segments also works")
    p.add_argument("--rois", type=Path, help="subchondral ROI label image (MFC=1, LFC=2, MTP=3, LTP=4) replacing "
                   "the automatic ROIs")
    p.add_argument("--model", type=Path, help="student model file (default: the shipped demo model; "
                   "demonstration only, not for clinical use)")
    p.add_argument("--diagnosis-model", type=Path, help="diagnosis model file (default: the shipped demo model, with the shipped student "
                        "only: a --model of your own needs a diagnosis model trained on its parameters)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--stride", type=float, default=4.0, metavar="MM", help="patch-centre spacing in mm (default 4)")
    p.add_argument("--tta", action="store_true", help="8 flipped copies per patch instead of 4 (slower, smoother "
                   "estimates and uncertainty)")
    p.add_argument("--side", choices=("L", "R"), help="knee side, if the anatomy cannot tell; in a CT of both "
                   "knees, the knee to analyse")
    p.add_argument("--no-harmonise", dest="harmonise", action="store_false",
                   help="do not blur a CT that is sharper than the model's training CTs (in-plane, or with "
                        "thinner slices) to their sharpness (default: match it; see docs/inference.md)")
    p.add_argument("--slice-thickness", type=float, metavar="MM",
                   help="the CT's nominal slice thickness, when its file does not say (a NIfTI converted from DICOM, "
                        "say; default: DICOM SliceThickness for a DICOM folder, else the slice spacing)")
    p.add_argument("--shard", help="batch mode: process shard i of N (i/N, from 0), for cluster job arrays")
    p.add_argument("--subject", help="the knee's ID in the outputs and the report (default: the CT's file name, or its "
                   "folder's for a file called ct, image, scan or volume; "
                   "in batch mode the manifest's 'subject' column)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import progress
    from ..errors import UserError
    from ..inference.batch import is_batch_input, run_batch
    from ..inference.engine import InferSettings, infer
    from ..registration.cohort import parse_shard

    if not args.ct.exists():
        raise UserError(f"CT not found: {args.ct}")
    if not 0 < args.stride <= 50:  # (NaN fails this too)
        raise UserError(f"--stride must be in (0, 50] mm, not {args.stride}")
    if args.slice_thickness is not None and not 0 < args.slice_thickness <= 20:
        raise UserError(f"--slice-thickness must be in (0, 20] mm, not {args.slice_thickness}")
    s = InferSettings(stride_mm=args.stride, tta=args.tta, device=args.device, side=args.side,
                      harmonise=args.harmonise, slice_thickness_mm=args.slice_thickness)
    if is_batch_input(args.ct):
        if args.segmentation or args.rois or args.subject:
            raise UserError("--segmentation/--rois/--subject apply to one CT; in batch mode give the manifest's "
                            "'ct_bones' and 'subject' columns")
        table = run_batch(args.ct, args.out, shard=parse_shard(args.shard), model_path=args.model, settings=s,
                          diagnosis_path=args.diagnosis_model)
        failed = table[table.status == "failed"]
        progress.info(f"{len(table) - len(failed)} of {len(table)} CTs analysed into {args.out}")
        for r in failed.itertuples():  # said even with --quiet, as an error is: the exit code alone names no knee
            print(f"ctsma infer: failed {r.subject}: {r.message}", file=sys.stderr)
        return 1 if len(failed) else 0
    if args.ct.is_dir():
        _refuse_a_folder_of_knee_folders(args.ct)
    if args.shard is not None:
        raise UserError("--shard needs a folder or manifest of CTs")
    if args.ct.is_dir() and args.out.resolve() == args.ct.resolve():  # a rerun would read its images as a batch
        raise UserError(f"--out {args.out} is the CT's DICOM folder; write the results to another folder")
    if args.subject is not None and not str(args.subject).strip():
        raise UserError("--subject is empty: give the knee's ID")
    summary = infer(args.ct, args.out, model_path=args.model, segmentation=args.segmentation, rois_path=args.rois,
                    settings=s, diagnosis_path=args.diagnosis_model, subject=args.subject)
    progress.info(f"{summary['n_patches']} patches in {summary['seconds']['total']:.1f} s; outputs in {args.out}")
    res = summary.get("ct_resolution") or {}
    if res.get("harmonisation_blur_mm"):
        progress.info(f"  CT sharper in-plane than the model's training CTs (edge sigma "
                      f"{res['inplane_edge_sigma_mm']:.2f} mm against {res['target_inplane_edge_sigma_mm']:.2f} mm): "
                      f"blurred in-plane by {res['harmonisation_blur_mm']:.2f} mm to match them")
    if res.get("through_plane_blur_mm"):
        progress.info(f"  CT slices thinner than the model's training CTs' ({res['slice_thickness_mm']:.2f} mm, "
                      f"{res['slice_spacing_mm']:.2f} mm apart, against {res['model_slice_thickness_mm']:.2f} mm): "
                      f"blurred along z by {res['through_plane_blur_mm']:.2f} mm to match them")
    for r in summary["roi_table"]:
        if r["parameter"] == "BV/TV":
            progress.info(f"  {r['roi']}: BV/TV {r['mean']:.3f} (n={r['n_patches']})")
    if summary.get("oa_probability") is not None:
        auc = summary.get("auc")
        progress.info(f"  OA probability {summary['oa_probability']:.2f}"
                      + (f" (model cross-validated AUC {auc:.3f})" if auc is not None else ""))
    if summary["model"].get("demo"):
        progress.info("  note: demo model trained on the digital phantom: not for clinical use")
    return 0


def _refuse_a_folder_of_knee_folders(folder: Path) -> None:
    """A folder with one subfolder per knee (``P0001/ct.nii.gz``, the phantom's layout) is neither a DICOM series nor
    a batch folder (whose CT files lie in it): said so, with the way to run it, instead of 'no DICOM series'."""
    import SimpleITK as sitk

    from ..errors import UserError
    from ..io.images import IMAGE_SUFFIXES

    nested = sorted(p for p in folder.glob("*/*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not nested or sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        return
    manifest = folder / "manifest.csv"
    raise UserError(f"{folder} holds no CT file or DICOM series itself, only subfolders with images in them "
                    f"({nested[0].relative_to(folder).as_posix()}, ...); batch mode reads a folder with the CT files "
                    f"in it, or a CSV manifest with a 'ct' column of their paths"
                    + (f" (such as {manifest}, if it lists the CTs)" if manifest.is_file() else ""))
