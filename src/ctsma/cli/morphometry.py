"""``ctsma morphometry IMAGE --out DIR``: trabecular parameters of one image (see docs/morphometry.md)."""

from __future__ import annotations

import argparse
import math
import os
import warnings


MAX_SMOOTH_VOX = 10.0  # a Gaussian pre-smoothing wider than this many voxels would wipe out any trabecula
MAX_THREADS = 256
# what this command can write beside morphometry.json; a rerun removes those it does not write again
MORPHOMETRY_OUTPUTS = ("tbth_map.nii.gz", "tbsp_map.nii.gz",
                       *(f"maps/{n}.nii.gz" for n in ("bvtv", "tbth", "tbsp", "tbn", "valid")))
VALID_MAP = "maps/valid.nii.gz"  # 1.0 where a window holds enough of the ROI: the sliding-window maps are 0 elsewhere
RESULT = "morphometry.json"  # written last: a folder without it is not a finished run


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "morphometry", help="trabecular bone parameters (BV/TV, Tb.Th, Tb.Sp, Tb.N, BS/BV, Conn.D) of an image",
        description="Measure trabecular bone microstructure in an image (binary, or grey-level CT/micro-CT/MR "
                    "binarised here) inside an optional ROI mask. Writes DIR/morphometry.json; optionally the "
                    "local-thickness maps and sliding-window parameter maps as NIfTI in the image's geometry. "
                    "Over the memory budget (CTSMA_MEMORY_GB) the image is measured in z-slabs, with the same "
                    "results.")
    p.add_argument("image", help="3D image (NIfTI, NRRD, MHA or a DICOM folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--mask", metavar="M", help="ROI mask on the same grid (non-zero = inside); default: whole image")
    p.add_argument("--label", type=int, default=None, metavar="N",
                   help="measure only the mask's voxels of label N (e.g. 3 for MTP in a CT-SMA rois.nii.gz)")
    p.add_argument("--modality", default="binary", choices=["binary", "ct", "microct", "mr"],
                   help="binary (bone = 1), ct/microct (bone bright) or mr (BFFE, bone dark); default: binary")
    p.add_argument("--threshold", default=None,
                   help="global threshold in image units, or 'otsu' (default for grey-level images)")
    p.add_argument("--method", default="global", choices=["global", "local"],
                   help="binarisation: one global threshold, or local adaptive (for MR with a bias field)")
    p.add_argument("--window-mm", type=float, default=None,
                   help="local binarisation: width (FWHM, mm) of the local mean (default 16 voxels)")
    p.add_argument("--offset", type=float, default=None,
                   help="local binarisation: how far (a fraction of the local mean) a voxel must be darker (mr) or "
                        "brighter than its local mean to be bone; default 0. On an image of non-negative values "
                        "(MR magnitude) mr needs an offset below 1 and ct/microct one above -1")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction before binarising")
    p.add_argument("--smooth-sigma", type=float, default=0.0, metavar="VOX",
                   help="Gaussian smoothing (sigma in voxels) before a grey-level threshold; default 0")
    p.add_argument("--convention", default="default", choices=["default", "bonej"],
                   help="local-thickness convention: default (bias-corrected) or bonej (BoneJ's rule)")
    p.add_argument("--spheres", default="roi", choices=["roi", "image"],
                   help="fit the spheres inside the ROI only (default) or in the whole image")
    p.add_argument("--thickness-method", default="fast", choices=["fast", "exact"],
                   help="local thickness: fast (reduced medial axis) or exact (every ridge sphere)")
    p.add_argument("--maps", action="store_true",
                   help="also write the local-thickness maps tbth_map.nii.gz and tbsp_map.nii.gz (mm)")
    p.add_argument("--window", type=int, default=None, metavar="VOX",
                   help="also write sliding-window maps maps/{bvtv,tbth,tbsp,tbn}.nii.gz with this window (voxels), "
                        "and maps/valid.nii.gz: 1 where a window holds at least half ROI, where the maps are "
                        "defined (0 elsewhere, as ITK's NIfTI reader would read NaN as 0)")
    p.add_argument("--stride", type=int, default=1, metavar="VOX", help="sampling step of the sliding-window maps")
    p.add_argument("--shape", action="store_true",
                   help="also the structure model index (SMI) and the degree of anisotropy (DA, MIL fabric)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPU cores)")
    p.set_defaults(func=run)


def _check_ignored(args) -> None:
    """Refuse options that the other settings make meaningless (they would be silently ignored)."""
    from ..errors import UserError

    if args.modality == "binary":
        grey = [f for f, on in (("--threshold", args.threshold is not None),
                                ("--method local", args.method != "global"),
                                ("--window-mm", args.window_mm is not None), ("--n4", args.n4),
                                ("--offset", args.offset is not None),
                                ("--smooth-sigma", args.smooth_sigma > 0)) if on]
        if grey:
            raise UserError(f"{', '.join(grey)} {'applies' if len(grey) == 1 else 'apply'} to binarising a grey-level "
                            "image, but --modality binary (the default) takes the image as bone = 1; give --modality "
                            "ct, microct or mr")
    if args.method == "local" and args.threshold is not None:  # before reading the image (and N4)
        raise UserError("--method local takes no --threshold (it thresholds against the local mean); give --offset "
                        "instead, or drop --method local")
    for flag, given in (("--window-mm", args.window_mm is not None), ("--offset", args.offset is not None)):
        if given and args.method != "local":
            raise UserError(f"{flag} belongs to --method local (the local mean); add --method local or drop it")
    if args.label is not None and not args.mask:
        raise UserError("--label picks a label of the ROI mask: give --mask too")
    if args.stride != 1 and args.window is None:
        raise UserError("--stride is the step of the sliding-window maps: give --window too")


def _memory_per_voxel(args) -> tuple[float, float]:
    """(peak before the slabs, held during the slabs) in bytes per input voxel of a z-slab run."""
    from ..io.memory import PREPARE_BYTES_PER_VOXEL, RESIDENT_BYTES_PER_VOXEL
    prep = PREPARE_BYTES_PER_VOXEL["morphometry"]  # image, 0/1 check or a global threshold's copy, ROI, bone
    if args.modality != "binary":
        prep += 4.0  # the float32 working copy and the ROI's values for the threshold
    if args.method == "local":
        prep += 24.0  # the Gaussian local means (float32 arrays of the image's size)
    if args.n4:
        prep += 24.0  # N4's corrected image and bias field
    resident = RESIDENT_BYTES_PER_VOXEL["morphometry"]
    if args.window is not None:
        resident += 8.0  # the two thickness maps, kept for the sliding windows
    return prep, resident


def _min_slab_bytes(args, size_xyz) -> int:
    """The smallest useful slab: one core plane and the smallest halo (distances of one voxel), on a whole plane."""
    from ..io.memory import plane_voxels
    from ..morphometry.slabs import halo_planes, slab_bytes
    a = plane_voxels(size_xyz)
    halo, extra = halo_planes(1e-12, 1.0, args.thickness_method)  # distances of a voxel or less
    need = slab_bytes(a, 1, halo, extra)
    if args.window is not None:
        need = max(need, (args.stride + 2 * (args.window // 2 + 1)) * a * 64.0)
    return int(need)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .. import PARAMETER_FILE_NAMES, progress
    from ..errors import UserError
    from ..io import check_same_geometry, ensure_writable_dir, read_image, staged_outputs, write_image
    from ..io.atomic import check_no_obstacle, remove_stale_outputs
    from ..morphometry import MorphometryWarning, binarise, measure_binary, sliding_window_maps
    from ..morphometry.maps import map_to_image

    if args.window is not None and args.window < 1 or args.stride < 1:
        raise UserError("--window and --stride must be positive numbers of voxels")
    if not (0 <= args.smooth_sigma <= MAX_SMOOTH_VOX):
        raise UserError(f"--smooth-sigma must be 0 (no smoothing) or a number of voxels up to {MAX_SMOOTH_VOX:g}, "
                        f"got {args.smooth_sigma}")
    if args.offset is not None and not math.isfinite(args.offset):
        raise UserError(f"--offset must be a finite fraction of the local mean, got {args.offset}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise UserError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
    _check_ignored(args)
    threads = args.threads or os.cpu_count() or 1
    from ..io.memory import header_size, plan_memory
    size = header_size(args.image)
    n_vox = None if size is None else int(np.prod(size, dtype=np.int64))
    # before reading: the whole image if it fits the budget, else z-slabs if the smallest one fits, else refuse
    prep, resident = _memory_per_voxel(args)
    from ..morphometry.shape import BYTES_PER_VOXEL as SHAPE_BYTES
    plan = plan_memory(n_vox, "morphometry", what=os.path.basename(args.image),
                       min_slab_bytes=_min_slab_bytes(args, size) if size else 0,
                       prepare_per_voxel=prep, resident_per_voxel=resident,
                       extra_whole_per_voxel=SHAPE_BYTES if args.shape else 0.0)
    out = ensure_writable_dir(args.out)
    check_no_obstacle(out, *_planned_outputs(args))  # a name in the way: refused now, not after the computation
    img = read_image(args.image, what="image")
    if args.window_mm is not None:
        extent = max(n * h for n, h in zip(img.GetSize(), img.GetSpacing()))
        if not (np.isfinite(args.window_mm) and 0 < args.window_mm <= extent):
            raise UserError(f"--window-mm must be a width in mm, above 0 and at most the image's extent "
                            f"({extent:.1f} mm), got {args.window_mm}")
    if args.window is not None and np.prod([min(1.0, n / args.window) for n in img.GetSize()]) < 0.5:
        raise UserError(f"--window {args.window} is too large for the image ({' x '.join(map(str, img.GetSize()))} "
                        "voxels): no window would hold half of its voxels in the image, so every map value is empty")
    if args.modality == "ct":  # a crop inside bone may lack air/fat, so implausible HU only warn here
        from ..io.images import check_ct_intensities
        try:
            check_ct_intensities(img, what="image")
        except UserError as exc:
            warnings.warn(f"{exc} (continuing because --modality ct was given)", stacklevel=1)
    mask = None
    if args.mask:
        m_img = read_image(args.mask, what="ROI mask")
        check_same_geometry(img, m_img, what_a="image", what_b="ROI mask")
        mask = _mask_of_label(sitk.GetArrayViewFromImage(m_img), args.label, args.mask)
        del m_img
    arr = sitk.GetArrayViewFromImage(img) if plan.chunked else sitk.GetArrayFromImage(img)
    spacing_zyx = tuple(img.GetSpacing())[::-1]
    threshold = args.threshold
    if threshold not in (None, "otsu"):
        try:
            threshold = float(threshold)
        except ValueError:
            raise UserError(f"--threshold must be a number or 'otsu', got {args.threshold!r}") from None
    progress.info(f"binarising ({args.modality}, {args.method})")
    bone, info = binarise(arr, spacing_zyx, mask, modality=args.modality, threshold=threshold, method=args.method,
                          n4=args.n4, window_mm=args.window_mm, smooth_sigma_vox=args.smooth_sigma,
                          **({} if args.offset is None else {"offset": args.offset}))
    if plan.chunked:
        from ..io.memory import Geometry
        geom = Geometry.of(img)
        del arr, img  # only the binary image and the ROI are kept
        with staged_outputs(out, marker=RESULT) as stage:
            res, files = _measure_in_slabs(args, bone, mask, spacing_zyx, geom, plan, threads, stage)
            if args.shape:
                from ..morphometry.parameters import shape_not_in_slabs
                res.update(shape_not_in_slabs(stacklevel=1))
            _finish(args, res, info, files, stage)
        remove_stale_outputs(out, MORPHOMETRY_OUTPUTS, files.values())
        _summary(res, out)
        return 0
    progress.info("local thickness of bone and marrow")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MorphometryWarning)
        res, maps = measure_binary(bone, spacing_zyx, mask, convention=args.convention, spheres=args.spheres,
                                   threads=threads, method=args.thickness_method, return_maps=True,
                                   slabs="auto" if plan.n_voxels is None else "never", shape=args.shape)
    for w in caught:
        warnings.warn(str(w.message), MorphometryWarning, stacklevel=1)
    files = {}
    with staged_outputs(out, marker=RESULT) as stage:
        if args.maps:
            for key, name in (("thickness", "tbth_map.nii.gz"), ("separation", "tbsp_map.nii.gz")):
                m = sitk.GetImageFromArray(maps[key].astype(np.float32))
                m.CopyInformation(img)
                write_image(m, stage / name)
                files[key + "_map"] = name
        if args.window is not None:
            progress.info(f"sliding-window maps (window {args.window}, stride {args.stride} voxels)")
            wmaps = sliding_window_maps(bone, spacing_zyx, args.window, args.stride, mask,
                                        convention=args.convention, thickness_maps=maps)
            (stage / "maps").mkdir()
            for key, arr_map in _as_written(wmaps).items():
                name = VALID_MAP if key == "valid" else f"maps/{PARAMETER_FILE_NAMES[key]}.nii.gz"
                write_image(map_to_image(arr_map, img, args.stride, args.window), stage / name)  # float32
                files[key] = name
        _finish(args, res, info, files, stage)
    remove_stale_outputs(out, MORPHOMETRY_OUTPUTS, files.values())
    _summary(res, out)
    if args.shape:
        progress.info(f"SMI {res['SMI']:.3f}  DA {res['DA']:.3f}")
    return 0


def _planned_outputs(args) -> list[str]:
    """The files a run with these options writes (the result last)."""
    names = ["tbth_map.nii.gz", "tbsp_map.nii.gz"] if args.maps else []
    if args.window is not None:
        names += [n for n in MORPHOMETRY_OUTPUTS if n.startswith("maps/")]
    return [*names, RESULT]


def _mask_of_label(labels, label: int | None, path: str):
    """The ROI of a mask image: its non-zero voxels, or those of ``label``; several labels without ``label`` warn."""
    import numpy as np

    from ..errors import UserError
    values = set()
    for z in range(0, labels.shape[0], 16):  # a few planes at a time: no sorted copy of a large mask
        values.update(np.unique(labels[z:z + 16]).tolist())
    found = sorted(int(v) if float(v).is_integer() else float(v) for v in values if v != 0)
    if label is not None:
        if label not in found:
            raise UserError(f"the ROI mask {path} has no voxel of label {label} (its labels: "
                            f"{', '.join(map(str, found)) or 'none'})")
        return labels == label
    if len(found) > 1:
        warnings.warn(f"the ROI mask holds {len(found)} labels ({', '.join(map(str, found[:8]))}"
                      f"{', ...' if len(found) > 8 else ''}), measured together as one ROI; give --label N to "
                      "measure one of them", stacklevel=2)
    return labels != 0


def _as_written(wmaps: dict) -> dict:
    """The sliding-window maps as the files hold them: undefined (NaN) windows as 0, and ``valid`` (see VALID_MAP)."""
    import numpy as np
    return {**{k: np.nan_to_num(v, nan=0.0) for k, v in wmaps.items()}, "valid": np.isfinite(wmaps["BV/TV"])}


def _finish(args, res: dict, info: dict, files: dict, stage) -> None:
    """Record the run's settings and files in the result, and write it into the staging folder (last)."""
    from ..io import write_json
    res["binarisation"] = info
    res["image"] = os.path.abspath(args.image)
    res["mask"] = os.path.abspath(args.mask) if args.mask else None
    if args.label is not None:
        res["mask_label"] = args.label
    if args.window is not None:
        res["window_voxels"] = args.window
        res["stride_voxels"] = args.stride
    res["files"] = files
    write_json(stage / RESULT, res)


def _summary(res: dict, out) -> None:
    from .. import progress
    progress.info(f"BV/TV {res['BV/TV']:.4f}  Tb.Th {res['Tb.Th']:.4f} mm  Tb.Sp {res['Tb.Sp']:.4f} mm  "
                  f"Tb.N {res['Tb.N']:.4f} /mm  -> {out / RESULT}")


def _measure_in_slabs(args, bone, mask, spacing_zyx, geom, plan, threads, out):
    """The z-slab run: thickness maps streamed to disk slab by slab; returns (result, files)."""
    import contextlib

    import numpy as np

    from .. import PARAMETER_FILE_NAMES, progress
    from ..io.memory import Geometry, plane_voxels, streamed_nifti
    from ..morphometry import MorphometryWarning
    from ..morphometry.maps import sliding_window_chunks, window_chunk_planes, window_origin
    from ..morphometry.parameters import slab_budget_error
    from ..morphometry.slabs import ArraySink, SlabMemoryError, StreamSink, TeeSink, measure_in_slabs

    name = os.path.basename(args.image)
    progress.info(plan.slab_notice(name, "measuring in z-slabs"))
    roi = mask if mask is not None else np.ones(bone.shape, bool)

    def report(done, total, message):
        progress.step("morphometry slabs", done, total, message)

    files: dict = {}
    with contextlib.ExitStack() as stack:
        writers = {}
        if args.maps:
            for key, fname in (("thickness", "tbth_map.nii.gz"), ("separation", "tbsp_map.nii.gz")):
                writers[key] = stack.enter_context(streamed_nifti(out / fname, geom, level=6))
                files[key + "_map"] = fname
        keep = ArraySink(bone.shape) if args.window is not None else None
        stream = StreamSink(writers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MorphometryWarning)
            try:
                res = measure_in_slabs(bone, roi, spacing_zyx, convention=args.convention, spheres=args.spheres,
                                       threads=threads, method=args.thickness_method, slab_budget=plan.slab_budget,
                                       sink=TeeSink(stream, keep), report=report)
            except SlabMemoryError as exc:
                raise slab_budget_error(exc, name, plan.n_voxels, plan.budget, plan.resident) from None
        for w in caught:
            warnings.warn(str(w.message), MorphometryWarning, stacklevel=1)
        stream.finish()
        if args.window is not None:
            chunk = window_chunk_planes(plan.slab_budget, plane_voxels(geom.size), args.window, args.stride)
            if chunk < 1:
                from ..errors import MemoryBudgetError
                from ..io.memory import budget_message
                need = plan.resident + (args.stride + 2 * (args.window // 2 + 1)) * plane_voxels(geom.size) * 64
                raise MemoryBudgetError(budget_message("morphometry", name, plan.n_voxels, int(need), plan.budget,
                                                       f"sliding windows of {args.window} voxels in z-chunks"))
            progress.info(f"sliding-window maps (window {args.window}, stride {args.stride} voxels), "
                          f"{chunk} output planes at a time")
            st = args.stride
            wgeom = Geometry(tuple(-(-n // st) for n in geom.size), tuple(float(s) * st for s in geom.spacing),
                             window_origin(geom, args.window), geom.direction)
            wwriters = {}
            for key in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "valid"):
                fname = VALID_MAP if key == "valid" else f"maps/{PARAMETER_FILE_NAMES[key]}.nii.gz"
                wwriters[key] = stack.enter_context(streamed_nifti(out / fname, wgeom, level=6))
                files[key] = fname
            for _, _, chunk_maps in sliding_window_chunks(bone, spacing_zyx, args.window, args.stride, roi,
                                                          thickness_maps=keep.maps, z_chunk=chunk):
                for key, arr_map in _as_written(chunk_maps).items():
                    wwriters[key].write(arr_map.astype(np.float32))
    return res, files
