"""``ctsma segment CT --out DIR``: bone labels and subchondral ROIs of a knee CT.

Writes ``DIR/bones.nii.gz`` (femur=1, tibia=2, patella=3, fibula=4), ``DIR/rois.nii.gz`` (MFC=1, LFC=2, MTP=3,
LTP=4), ``DIR/rois.seg.nrrd`` and ``DIR/bones.seg.nrrd`` (Slicer segmentations with named segments) and
``DIR/segmentation.json`` (volumes, laterality and settings), and with ``--figure`` ``DIR/rois.png``. A user bone segmentation (``--bones``, label image
or ``.seg.nrrd``) replaces the automatic one.
"""

from __future__ import annotations

import os
import time

from .. import progress
from ..io import ensure_writable_dir, read_image, staged_outputs, write_image, write_json
from ..io.atomic import remove_stale_outputs

SEGMENT_OUTPUTS = ("bones.nii.gz", "bones.seg.nrrd", "rois.nii.gz", "rois.seg.nrrd", "rois.png", "segmentation.json")


def add_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment femur/tibia/patella/fibula and the subchondral ROIs of a knee CT",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("ct", help="knee CT in HU (NIfTI, NRRD, MHA or DICOM folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bones", default=None,
                   help="use this bone segmentation instead of the automatic one (label image or .seg.nrrd)")
    p.add_argument("--side", choices=("L", "R"), default=None,
                   help="knee side from metadata (default: from anatomy, the fibula is lateral); in a CT of both "
                        "knees, the knee to segment")
    p.add_argument("--start-mm", type=float, default=None, help="ROI band start depth below the surface (1.0)")
    p.add_argument("--end-mm", type=float, default=None, help="ROI band end depth below the surface (6.0)")
    p.add_argument("--threshold-hu", type=float, default=None, help="bone threshold in HU (250)")
    p.add_argument("--no-rois", action="store_true", help="bones only")
    p.add_argument("--figure", action="store_true", help="also write DIR/rois.png (slices through the ROIs)")
    p.set_defaults(func=run)


def _check_ignored(args) -> None:
    """Refuse options that the other options make meaningless (they would be silently ignored)."""
    from ..errors import UserError

    if args.no_rois:
        given = [f for f, on in (("--start-mm", args.start_mm is not None), ("--end-mm", args.end_mm is not None),
                                 ("--figure", args.figure)) if on]
        if given:
            raise UserError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to the ROIs, but "
                            "--no-rois writes the bones only; drop one or the other")
    if args.bones and args.threshold_hu is not None:
        raise UserError("--threshold-hu applies to the automatic bone segmentation, which --bones replaces; "
                        "drop one or the other")


def run(args) -> int:
    from ..config import load_config
    from ..errors import UserError
    from ..io.images import check_ct_intensities
    from ..segmentation import (BoneSegmentationSettings, read_user_labels, segment_bones, subchondral_rois,
                                write_seg_nrrd)

    from ..segmentation.rois import RoiSettings
    from .options import given, named_as_options

    _check_ignored(args)
    # every option through its settings' checks before any work (the segmentation takes a while)
    bone_over, bone_names = given((("threshold_hu", "--threshold-hu", args.threshold_hu),))
    roi_over, roi_names = given((("start_mm", "--start-mm", args.start_mm), ("end_mm", "--end-mm", args.end_mm)))
    with named_as_options({**bone_names, **roi_names}):
        settings = load_config(None, BoneSegmentationSettings, overrides=bone_over)
        roi_settings = load_config(None, RoiSettings, overrides=roi_over)
    if not args.no_rois and not 0 <= roi_settings.start_mm < roi_settings.end_mm:
        raise UserError(f"--start-mm must be below --end-mm (got {roi_settings.start_mm} and {roi_settings.end_mm})")
    if any(os.path.isfile(os.path.join(args.out, n)) for n in ("summary.json", "roi_table.csv")):
        raise UserError(f"{args.out} is the output folder of 'ctsma infer': its bones.nii.gz and rois.nii.gz would no "
                        "longer be those of its maps; choose another --out")
    out = ensure_writable_dir(args.out)
    ct = read_image(args.ct, what="CT")
    check_ct_intensities(ct)
    t0 = time.time()
    report: dict = {"ct": str(args.ct)}
    if args.bones:
        bones = read_user_labels(args.bones, ct, "bones")
        report["bones_from"] = str(args.bones)
    else:
        progress.info("segmenting bones ...")
        bones, info = segment_bones(ct, settings, return_info=True, side=args.side)
        report["bones_from"] = "automatic"
        report["bone_segmentation"] = info
    # compute everything before writing anything (a failed ROI placement must not leave bones behind)
    rois = rinfo = None
    if not args.no_rois:
        progress.info("placing subchondral ROIs ...")
        rois, rinfo = subchondral_rois(ct, bones, side=args.side, settings=roi_settings, return_info=True)
        report["rois"] = rinfo
    report["seconds"] = time.time() - t0
    with staged_outputs(out) as stage:
        write_image(bones, stage / "bones.nii.gz")
        write_seg_nrrd(bones, stage / "bones.seg.nrrd", kind="bones")
        if rois is not None:
            write_image(rois, stage / "rois.nii.gz")
            write_seg_nrrd(rois, stage / "rois.seg.nrrd", kind="rois")
            if args.figure:
                from ..segmentation.figure import render_rois
                render_rois(ct, bones, rois, stage / "rois.png", info=rinfo)
        write_json(stage / "segmentation.json", report)
        produced = [str(f.relative_to(stage)) for f in stage.rglob("*") if f.is_file()]
    remove_stale_outputs(out, SEGMENT_OUTPUTS, produced)  # e.g. an earlier run's ROIs after --no-rois
    progress.info(f"wrote {out}/bones.nii.gz" + ("" if args.no_rois else " and rois.nii.gz"))
    return 0
