"""``ctsma morphometry IMAGE --out DIR``: trabecular parameters of one image (see docs/morphometry.md)."""

from __future__ import annotations

import argparse
import os
import warnings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "morphometry", help="trabecular bone parameters (BV/TV, Tb.Th, Tb.Sp, Tb.N, BS/BV, Conn.D) of an image",
        description="Measure trabecular bone microstructure in an image (binary, or grey-level CT/micro-CT/MR "
                    "binarised here) inside an optional ROI mask. Writes DIR/morphometry.json; optionally the "
                    "local-thickness maps and sliding-window parameter maps as NIfTI in the image's geometry.")
    p.add_argument("image", help="3D image (NIfTI, NRRD, MHA or a DICOM folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--mask", metavar="M", help="ROI mask on the same grid (non-zero = inside); default: whole image")
    p.add_argument("--modality", default="binary", choices=["binary", "ct", "microct", "mr"],
                   help="binary (bone = 1), ct/microct (bone bright) or mr (BFFE, bone dark); default: binary")
    p.add_argument("--threshold", default=None,
                   help="global threshold in image units, or 'otsu' (default for grey-level images)")
    p.add_argument("--method", default="global", choices=["global", "local"],
                   help="binarisation: one global threshold, or local adaptive (for MR with a bias field)")
    p.add_argument("--window-mm", type=float, default=None,
                   help="local binarisation: width (FWHM, mm) of the local mean (default 16 voxels)")
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
                   help="also write sliding-window maps maps/{bvtv,tbth,tbsp,tbn}.nii.gz with this window (voxels)")
    p.add_argument("--stride", type=int, default=1, metavar="VOX", help="sampling step of the sliding-window maps")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPU cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .. import PARAMETER_FILE_NAMES, progress
    from ..errors import UserError
    from ..io import check_same_geometry, ensure_writable_dir, read_image, write_image, write_json
    from ..morphometry import MorphometryWarning, binarise, measure_binary, sliding_window_maps
    from ..morphometry.maps import map_to_image

    if args.window is not None and args.window < 1 or args.stride < 1:
        raise UserError("--window and --stride must be positive numbers of voxels")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    threads = args.threads or os.cpu_count() or 1
    from ..io.memory import check_memory, header_voxels
    check_memory(header_voxels(args.image), "morphometry", what=os.path.basename(args.image))  # before reading
    out = ensure_writable_dir(args.out)
    img = read_image(args.image, what="image")
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
        mask = sitk.GetArrayFromImage(m_img) != 0
    arr = sitk.GetArrayFromImage(img)
    spacing_zyx = tuple(img.GetSpacing())[::-1]
    threshold = args.threshold
    if threshold not in (None, "otsu"):
        try:
            threshold = float(threshold)
        except ValueError:
            raise UserError(f"--threshold must be a number or 'otsu', got {args.threshold!r}") from None
    progress.info(f"binarising ({args.modality}, {args.method})")
    bone, info = binarise(arr, spacing_zyx, mask, modality=args.modality, threshold=threshold, method=args.method,
                          n4=args.n4, window_mm=args.window_mm, smooth_sigma_vox=args.smooth_sigma)
    progress.info("local thickness of bone and marrow")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MorphometryWarning)
        res, maps = measure_binary(bone, spacing_zyx, mask, convention=args.convention, spheres=args.spheres,
                                   threads=threads, method=args.thickness_method, return_maps=True)
    for w in caught:
        warnings.warn(str(w.message), MorphometryWarning, stacklevel=1)
    res["binarisation"] = info
    res["image"] = os.path.abspath(args.image)
    res["mask"] = os.path.abspath(args.mask) if args.mask else None
    files = {}
    if args.maps:
        for key, name in (("thickness", "tbth_map.nii.gz"), ("separation", "tbsp_map.nii.gz")):
            m = sitk.GetImageFromArray(maps[key].astype(np.float32))
            m.CopyInformation(img)
            write_image(m, out / name)
            files[key + "_map"] = name
    if args.window is not None:
        progress.info(f"sliding-window maps (window {args.window}, stride {args.stride} voxels)")
        wmaps = sliding_window_maps(bone, spacing_zyx, args.window, args.stride, mask,
                                    convention=args.convention, thickness_maps=maps)
        (out / "maps").mkdir(exist_ok=True)
        for key, arr_map in wmaps.items():
            name = f"maps/{PARAMETER_FILE_NAMES[key]}.nii.gz"
            write_image(map_to_image(arr_map, img, args.stride), out / name)
            files[key] = name
        res["window_voxels"] = args.window
        res["stride_voxels"] = args.stride
    res["files"] = files
    write_json(out / "morphometry.json", res)
    progress.info(f"BV/TV {res['BV/TV']:.4f}  Tb.Th {res['Tb.Th']:.4f} mm  Tb.Sp {res['Tb.Sp']:.4f} mm  "
                  f"Tb.N {res['Tb.N']:.4f} /mm  -> {out / 'morphometry.json'}")
    return 0
