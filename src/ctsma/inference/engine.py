"""CT-only inference on one knee CT: bones → subchondral ROIs → sliding-window student → maps and tables.

Outputs (contract, ``ctsma infer CT --out DIR``)::

    DIR/maps/{bvtv,tbth,tbsp,tbn}.nii.gz          float32 maps in the CT's geometry, 0 outside the ROIs
    DIR/uncertainty/{bvtv,tbth,tbsp,tbn}.nii.gz   SD over test-time augmentations, 0 outside the ROIs
    DIR/rois.nii.gz, DIR/bones.nii.gz             label images (ROIs MFC=1..LTP=4; femur=1, tibia=2, ...)
    DIR/roi_table.csv                             roi, parameter, mean, sd, median, iqr, n_patches
    DIR/patches.csv                               one row per patch: subject, roi, centre, rel position, predictions
    DIR/summary.json                              ROI table, model provenance, diagnosis (where a model exists)

All files are first written to a hidden staging folder inside DIR and moved into place only when the
whole analysis has succeeded, so a failed run leaves no partial output.

Memory: when the estimate from the CT's header (``ctsma.io.memory``) is over the budget, the CT's pixels are
released while bones and ROIs are found on the coarse copy (read again for the patches) and once the patches
are cut, and the maps are blended in z-slabs of the ROI box and streamed to their files plane by plane; every
output is the same bit for bit. Only when even reading and segmenting the CT, or a one-plane slab, would not
fit is the CT refused, before its pixels are read.

Background: the maps hold :data:`BACKGROUND` (0) outside the ROIs, with ``rois.nii.gz > 0`` as the mask.
NaN would be the natural marker, but ITK's NIfTI reader (ITK 5.4, hence SimpleITK and Slicer) silently
reads NaN voxels as 0, so a NaN background would look different to different readers; 0 is explicit
and lies outside the physical range of every parameter inside bone.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import PARAMETER_FILE_NAMES, PARAMETER_UNITS, PARAMETERS, ROIS, progress
from ..errors import InputImageError, UserError
from ..harmonise import (MATCH_TOLERANCE_MM, PATCH, blurred_crop, inplane_edge_sigma, inplane_target, matching_blur,
                         slice_thickness, through_plane_blur, through_plane_sigma)
from ..io import read_image, write_image, write_json
from ..io.atomic import ensure_writable_dir, staged_outputs
from ..io.images import check_ct_intensities, same_grid, subject_from_path
from ..models.export import FLIPS_DEFAULT, FLIPS_TTA
from ..resources import resource_path
from ..segmentation.geometry import crop_box
from .maps import blend_maps, display_ranges, roi_table

MAX_SLICE_MM = 2.0
SOFTER_FACTOR = 1.15   # in-plane edge sigma over the model's reference above which a CT is called softer
SLICE_RATIO = 1.25     # through-plane sigma ratio to the model's training CTs beyond which a warning is given
AXIAL_COS = 0.9        # |cos| between the slice axis and the patient's z below which a CT is not axial
THIN_ROI_FRACTION = 0.3    # least ROI share of a patch for an ROI too thin for InferSettings.min_roi_fraction
BACKGROUND = 0.0  # the maps outside the ROIs (_MapCanvas starts from a zero-filled image)


@dataclass
class InferSettings:
    stride_mm: float = 4.0
    tta: bool = False
    device: str = "auto"
    batch_size: int = 256
    side: str | None = None
    min_roi_fraction: float = 0.5
    """Least share of a patch cube inside its ROI: the training dataset's rule (``BuildSettings.min_roi_fraction``),
    so that the student sees patches like those it learnt from. An ROI with no such patch (a thin one) takes
    patches with at least :data:`THIN_ROI_FRACTION` of it, with a warning."""
    harmonise: bool = True
    """Blur a CT that is sharper than the model's training CTs to their sharpness before cutting patches, in-plane
    (measured edge sigma) and through-plane (thinner slices; :mod:`ctsma.harmonise`); a softer CT or thicker
    slices get a warning."""
    slice_thickness_mm: float | None = None
    """The CT's nominal slice thickness (mm) when the file does not carry it (a NIfTI exported from DICOM, say);
    ``None``: DICOM SliceThickness for a DICOM series, else the slice spacing."""
    segmentation_spacing_mm: tuple = (0.7, 0.7, 1.0)
    """Bones and ROIs are found on a copy of the CT at this coarsest (x, y, z) spacing when the CT is finer (a
    512x512x300 clinical CT is 4x smaller then), and their labels are resampled back to the CT grid; the patches
    are always cut from the full-resolution CT."""


def request_record(ct_path, model_meta: dict, s: InferSettings, segmentation, rois_path, diagnosis_path, *,
                   model_path) -> dict:
    """What a run was asked to do (inputs, model, settings that change the outputs): batch mode redoes a finished
    case whose record differs, instead of keeping its results from other settings. ``model_path``: the student's
    file, stamped by its bytes (``model_meta``'s checksum covers its weights only, not the metadata that changes
    the outputs too: target normalisation, the training CTs' sharpness and intensity)."""
    from dataclasses import asdict

    def path(p):
        return str(Path(p).resolve()) if p else None

    from ..io.atomic import content_sha256, input_stamp, to_jsonable

    settings = {k: v for k, v in asdict(s).items() if k not in ("device", "batch_size")}
    stamps = {k: input_stamp(v) for k, v in (("ct", ct_path), ("segmentation", segmentation), ("rois", rois_path))}
    # the diagnosis model by its bytes, not its size and time: one copied over it with its time kept (cp -p, rsync)
    # is caught, and a file only touched is not a new model
    stamps["diagnosis_model_sha256"] = content_sha256(diagnosis_path)
    stamps["student_model_sha256"] = content_sha256(model_path)
    return to_jsonable({"ct": path(ct_path), "segmentation": path(segmentation), "rois": path(rois_path),
                        "stamps": stamps, "model_sha256": model_meta.get("_sha256"),
                        "diagnosis_model": path(diagnosis_path), "settings": settings})


def earlier_stamps(diagnosis_path) -> dict:
    """The stamps that a record of an earlier version holds and :func:`request_record` no longer makes, as the
    inputs are now (``same_request``'s ``legacy``): the diagnosis model's size and time, so that a model retrained
    since that version wrote the record is still caught."""
    from ..io.atomic import input_stamp

    return {"diagnosis_model": input_stamp(diagnosis_path)}


def default_model_path(must_exist: bool = True) -> Path:
    return resource_path("Models", "student_demo.safetensors", must_exist=must_exist)


def default_diagnosis_path() -> Path | None:
    p = resource_path("Models", "diagnosis_demo.safetensors", must_exist=False)
    return p if p.is_file() else None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is available to torch "
                        "(check the driver and that a CUDA build of torch is installed), or use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, not {name!r}")
    return name


def check_ct(ct: sitk.Image) -> list[str]:
    """Refuse implausible CTs; return warnings for CTs that can still be analysed."""
    check_ct_intensities(ct)
    warns = []
    sp = ct.GetSpacing()
    if max(sp) > MAX_SLICE_MM:
        warns.append(f"the CT has {max(sp):.2f} mm voxels along one axis (> {MAX_SLICE_MM} mm slices); "
                     "estimates from such thick slices are less reliable than the model's validation suggests")
    return warns


def ct_resolution(ct: sitk.Image, meta: dict, harmonise: bool = True,
                  slice_thickness_mm: float | None = None) -> tuple[dict, list[str]]:
    """The CT's sharpness against the model's training CTs: (summary block, warnings). The block's
    ``harmonisation_blur_mm`` and ``through_plane_blur_mm`` are the in-plane and through-plane Gaussian sigmas
    that the patches are cut after (0: none). ``slice_thickness_mm``: the CT's nominal slice thickness when the
    caller knows it (else DICOM SliceThickness or the slice spacing, :func:`ctsma.harmonise.slice_thickness`)."""
    inp = meta.get("input") or {}
    ref = inp.get("ct_reference") or {}
    patch = (float(inp.get("spacing_mm", PATCH[0])), int(inp.get("patch_size", PATCH[1])))
    est = inplane_edge_sigma(ct)
    dz, ref_dz = float(ct.GetSpacing()[2]), ref.get("slice_spacing_mm")
    thick, thick_source = (slice_thickness_mm, "given") if slice_thickness_mm else slice_thickness(ct)
    ref_thick = ref.get("slice_thickness_mm") or ref_dz  # files written before thickness was recorded: spacing
    pixel = (ct.GetSpacing()[0] + ct.GetSpacing()[1]) / 2
    info = {"inplane_edge_sigma_mm": None if est is None else round(est["sigma_mm"], 4),
            "model_inplane_edge_sigma_mm": ref.get("inplane_edge_sigma_mm"), "pixel_size_mm": pixel,
            "model_pixel_size_mm": ref.get("inplane_spacing_mm"), "slice_spacing_mm": dz,
            "model_slice_spacing_mm": ref_dz, "slice_thickness_mm": thick, "slice_thickness_source": thick_source,
            "model_slice_thickness_mm": ref_thick, "harmonisation_blur_mm": 0.0, "through_plane_blur_mm": 0.0}
    warns = []
    if not ref:
        info["note"] = "the model file records no training-CT resolution, so the CT is used as it is"
        return info, warns
    if abs(ct.GetDirection()[8]) < AXIAL_COS:
        info["note"] = "the CT's slices are not axial, so its sharpness is not matched to the model's training CTs"
        warns.append("the CT's slices are not axial (its slice axis is more than 25 degrees off the patient's "
                     "head-foot axis), so its sharpness is not matched to the model's training CTs' "
                     "(docs/inference.md, 'Other scanners')")
        return info, warns
    r = inplane_target(float(ref["inplane_edge_sigma_mm"]), ref.get("inplane_spacing_mm"), pixel, patch)
    info["target_inplane_edge_sigma_mm"] = None if r is None else round(r, 4)  # allowing for the pixel sizes
    if r is None:
        warns.append(f"the CT's pixels ({pixel:.2f} mm) are too coarse for the model's training CTs "
                     f"({float(ref['inplane_spacing_mm']):.2f} mm): its patches are softer in-plane than theirs "
                     "whatever its kernel, and BV/TV and Tb.Th read low on such CTs (docs/inference.md, "
                     "'Other scanners')")
    elif est is None:
        warns.append("the CT's in-plane sharpness could not be measured (no clean air/body edge in the field of "
                     "view), so it is not matched to the model's training CTs")
    else:
        e = est["sigma_mm"]
        if harmonise:
            match = matching_blur(ct, r, sigma_mm=e)
            if match["blur_mm"] > 0:
                info["harmonisation_blur_mm"] = round(match["blur_mm"], 4)
                info["inplane_edge_sigma_after_mm"] = round(match["sigma_after_mm"], 4)
        if e > SOFTER_FACTOR * r:
            warns.append(f"the CT is softer in-plane than the model's training CTs (edge sigma {e:.2f} mm against "
                         f"{r:.2f} mm; a smoother kernel or larger voxels): BV/TV and Tb.Th read low on such CTs "
                         "(docs/inference.md, 'Other scanners')")
        elif not harmonise and e < r - MATCH_TOLERANCE_MM:
            warns.append(f"the CT is sharper in-plane than the model's training CTs (edge sigma {e:.2f} mm against "
                         f"{r:.2f} mm) and --no-harmonise is set: BV/TV and Tb.Th read high on such CTs")
    if ref_dz:
        z_own, z_ref = through_plane_sigma(thick, dz, patch), through_plane_sigma(ref_thick, ref_dz, patch)
        info["through_plane_sigma_mm"], info["model_through_plane_sigma_mm"] = round(z_own, 4), round(z_ref, 4)
        if harmonise:
            info["through_plane_blur_mm"] = round(through_plane_blur(z_own, z_ref), 4)
        if z_own > SLICE_RATIO * z_ref:
            warns.append(f"the CT's slices ({thick:.2f} mm thick, {dz:.2f} mm apart) are thicker than the model's "
                         f"training CTs' ({ref_thick:.2f} mm, {ref_dz:.2f} mm apart) and cannot be sharpened: "
                         "estimates shift with the through-plane resolution (docs/inference.md, 'Other scanners')")
        elif not harmonise and z_own * SLICE_RATIO < z_ref:
            warns.append(f"the CT's slices ({thick:.2f} mm thick, {dz:.2f} mm apart) are thinner than the model's "
                         f"training CTs' ({ref_thick:.2f} mm, {ref_dz:.2f} mm apart) and --no-harmonise is set: "
                         "estimates shift with the through-plane resolution (docs/inference.md, 'Other scanners')")
    return info, warns


class _MapCanvas:
    """One full-size float32 image in the CT's geometry, :data:`BACKGROUND` outside the ROI box, whose box is
    overwritten in place by each map before it is written: the eight maps then cost one full-size allocation
    instead of eight, and no full-size copy each (the box is the same for every map)."""

    def __init__(self, ref: sitk.Image, box):
        self.img = sitk.Image([int(v) for v in ref.GetSize()], sitk.sitkFloat32)  # zero-filled: BACKGROUND is 0
        self.img.CopyInformation(ref)
        self.box = box
        self.index = [int(b.start) for b in reversed(box)]  # SimpleITK index order (x, y, z)

    def with_map(self, crop: np.ndarray) -> sitk.Image:
        """The canvas holding ``crop`` (z, y, x, the box's shape; NaN read as background) in its box."""
        part = sitk.GetImageFromArray(np.nan_to_num(crop, nan=BACKGROUND).astype(np.float32, copy=False))
        part.SetSpacing(self.img.GetSpacing())
        part.SetDirection(self.img.GetDirection())
        part.SetOrigin(self.img.TransformIndexToPhysicalPoint(self.index))
        x, y, z = (slice(b.start, b.stop) for b in reversed(self.box))
        self.img[x, y, z] = part  # SimpleITK pastes in place
        return self.img


def _patch_centres(rois: sitk.Image, roi_arr: np.ndarray, s: InferSettings, extent: float,
                   warns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Patch centres (LPS mm) on the ``s.stride_mm`` grid of each ROI where a patch cube holds at least
    ``s.min_roi_fraction`` of it (a thin ROI: :data:`THIN_ROI_FRACTION`, with a warning), and each centre's ROI
    name; warns about ROIs without a patch and refuses ROIs without any. Warnings are also added to ``warns``."""
    from ..dataset.sampling import roi_centres

    rng = np.random.default_rng(0)
    centres, names = [], []
    for name, value in ROIS.items():
        c, _ = roi_centres(rois, value, s.stride_mm, extent, s.min_roi_fraction, 10 ** 7, rng)
        if not len(c) and s.min_roi_fraction > THIN_ROI_FRACTION:  # a thin ROI: patches with less of it
            c, _ = roi_centres(rois, value, s.stride_mm, extent, THIN_ROI_FRACTION, 10 ** 7, rng)
            if len(c):
                msg = (f"ROI {name} is thin: no patch holds {s.min_roi_fraction:.0%} of it, as the training patches "
                       f"did; its {len(c)} patches hold at least {THIN_ROI_FRACTION:.0%}, so its values are less "
                       "reliable")
                if _fits_off_grid(rois, value, extent, s.min_roi_fraction):  # not thin: the stride missed them
                    msg = (f"ROI {name}: no centre of the {s.stride_mm:g}-mm patch grid (--stride) has a patch "
                           f"holding {s.min_roi_fraction:.0%} of it, as the training patches did, although such "
                           f"patches fit; its {len(c)} patches hold at least {THIN_ROI_FRACTION:.0%}, so its values "
                           "are less reliable; use a smaller --stride")
                warnings.warn(msg, stacklevel=3)
                warns.append(msg)
        centres.append(c)
        names += [name] * len(c)
    missing = [n for n in ROIS if n not in names]
    # ROIs that a patch holding THIN_ROI_FRACTION of them fits, only at no centre of this stride's grid: not thin
    missed = [n for n in missing if (roi_arr == ROIS[n]).any()
              and _fits_off_grid(rois, ROIS[n], extent, THIN_ROI_FRACTION)]
    stride_grid = f"the {s.stride_mm:g}-mm patch grid (--stride)"
    if names and missing:  # (no patch at all is refused next)
        why = [f"{n} empty" if not (roi_arr == ROIS[n]).any() else
               f"{n}: no centre of {stride_grid} where a patch holds {THIN_ROI_FRACTION:.0%} of it" if n in missed else
               f"{n} too thin for {THIN_ROI_FRACTION:.0%} of a patch" for n in missing]
        msg = (f"ROI(s) {', '.join(missing)} have no patch ({'; '.join(why)}): their rows of roi_table.csv are "
               "empty; " + ("use a smaller --stride" if len(missed) == len(missing) else "check the ROI segmentation"
                            + (" or use a smaller --stride" if missed else "")))
        warnings.warn(msg, stacklevel=3)
        warns.append(msg)
    if not names:
        if missed:
            raise InputImageError(f"no centre of {stride_grid} falls where a patch holds {THIN_ROI_FRACTION:.0%} of "
                                  f"an ROI, although such patches fit ({', '.join(missed)}); use a smaller --stride")
        raise InputImageError("no patch fits the subchondral ROIs (they are thinner than a patch); "
                              "check the ROIs or use a smaller --stride")
    return np.concatenate(centres), names


def infer(ct_path, out_dir, *, model_path=None, segmentation=None, rois_path=None, settings: InferSettings | None = None,
          diagnosis_path=None, subject: str | None = None) -> dict:
    """Analyse one knee CT and write the contract outputs to ``out_dir``; returns the summary."""
    from ..dataset.sampling import cut, cut_ct, relative_positions
    from .intensity import intensity_check
    from ..models.export import describe, load_student, trained_on_phantom
    from ..segmentation import segment_bones, subchondral_rois
    from ..segmentation.labelio import bone_labels_mismatch, read_user_labels

    s = settings or InferSettings()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    from ..io.memory import SLAB_BYTES_PER_VOXEL, Geometry, header_size, plan_memory, plane_voxels
    hdr = header_size(ct_path)
    plan = plan_memory(None if hdr is None else int(np.prod(hdr, dtype=np.int64)), "infer",
                       what=f"CT {Path(ct_path).name}",  # before reading the pixels
                       min_slab_bytes=int(SLAB_BYTES_PER_VOXEL["infer"] * plane_voxels(hdr)) if hdr else 0)
    warns: list[str] = []  # summary.json's warnings: every one the run gives
    with _kept_warnings(warns):  # a DICOM folder holding several series
        ct = read_image(ct_path, what="CT")
    if plan.chunked:
        progress.info(plan.slab_notice("the CT", "maps are blended and written in z-slabs"))
    ensure_writable_dir(out_dir)  # refuse an unwritable output folder before any work
    ct_warns = check_ct(ct)
    for w in ct_warns:
        warnings.warn(w, stacklevel=2)
    warns += ct_warns
    model_path = Path(model_path) if model_path else default_model_path()
    model, meta = load_student(model_path)
    diagnosis_model = load_diagnosis(diagnosis_path, model_path)
    own_student = not _same_file(model_path, default_model_path(must_exist=False))
    if diagnosis_model[0] is None and own_student:
        warnings.warn(NO_DIAGNOSIS_FOR_OWN_STUDENT, stacklevel=2)
        warns.append(NO_DIAGNOSIS_FOR_OWN_STUDENT)
    resolution, res_warns = ct_resolution(ct, meta, s.harmonise, s.slice_thickness_mm)
    for w in res_warns:
        warnings.warn(w, stacklevel=2)
    warns += res_warns
    device = _device(s.device)
    model.to(device)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    seg_ct = None if (segmentation and rois_path) else _coarse_copy(ct, s.segmentation_spacing_mm)
    if segmentation:
        with _kept_warnings(warns):  # resampled onto the CT's grid, segments ignored
            bones = read_user_labels(segmentation, ct, kind="bones")
        bones_from = str(segmentation)
    # over the budget, the CT's pixels are released while bones and ROIs are found on the coarse copy, and read
    # again for the patches (the ROI placement is the peak of a whole-CT run)
    released = plan.chunked and not rois_path and seg_ct is not None and seg_ct is not ct
    grid = Geometry.of(ct) if released else ct
    if released:
        ct = None
    if not segmentation:
        coarse_bones = segment_bones(seg_ct, side=s.side)
        bones = None if released else _to_grid(coarse_bones, grid)
        bones_from = "automatic"
    timings["bones"] = time.perf_counter() - t
    t = time.perf_counter()
    side_info = {"side": s.side, "side_from": "metadata" if s.side else None}
    if rois_path:
        with _kept_warnings(warns):
            rois = read_user_labels(rois_path, ct, kind="rois")
        rois_from = str(rois_path)
    else:
        seg_bones = coarse_bones if not segmentation else _to_grid(bones, seg_ct)
        mismatch = segmentation and bone_labels_mismatch(seg_ct, seg_bones)  # another knee's, mirrored, ...
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
            warns.append(mismatch)
        with _kept_warnings(warns):   # a side told by a weak cue
            roi_img, roi_info = subchondral_rois(seg_ct, seg_bones, side=s.side, return_info=True)
        rois = _to_grid(roi_img, grid)
        rois_from = "automatic"
        side_info = {"side": roi_info["side"], "side_from": roi_info["side_from"]}
    if released:
        if bones is None:
            bones = _to_grid(coarse_bones, grid)
        seg_ct = coarse_bones = seg_bones = None  # noqa: F841
        ct = read_image(ct_path, what="CT")
    roi_arr = sitk.GetArrayFromImage(rois)
    if not roi_arr.any():
        raise InputImageError("the subchondral ROIs are empty: no femoral condyle or tibial plateau was found "
                              "(check the bone segmentation)")
    timings["rois"] = time.perf_counter() - t

    t = time.perf_counter()
    inp = meta["input"]
    extent, size = float(inp["extent_mm"]), int(inp["patch_size"])
    centres, names = _patch_centres(rois, roi_arr, s, extent, warns)
    labels = np.array([ROIS[n] for n in names], np.int16)
    blur, zblur = resolution["harmonisation_blur_mm"], resolution["through_plane_blur_mm"]
    source = blurred_crop(ct, roi_arr, extent, blur, zblur) if blur > 0 or zblur > 0 else ct
    patches = cut_ct(source, centres, size, extent)[:, None]
    del source
    intensity, int_warns = intensity_check(patches, inp.get("ct_intensity"))
    for w in int_warns:
        warnings.warn(w, stacklevel=2)
    warns += int_warns
    masks = None
    if "mask" in inp["channels"]:
        mk = cut(rois, centres, size, extent, interpolator=sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)
        masks = (mk == labels[:, None, None, None]).astype(np.float32)[:, None]
    cidx = np.rint([ct.TransformPhysicalPointToContinuousIndex(tuple(map(float, c))) for c in centres]
                   ).astype(int)[:, ::-1]
    if plan.chunked:  # the CT's pixels are not needed any more: keep its grid only
        ct = Geometry.of(ct)
        seg_ct = coarse_bones = seg_bones = None  # noqa: F841 - releases the coarse copies
    timings["patches"] = time.perf_counter() - t
    t = time.perf_counter()
    flips = FLIPS_TTA if s.tta else FLIPS_DEFAULT
    with progress_stage("infer", len(flips)):
        mean, sd = model.predict_flips(patches, masks, flips, s.batch_size)
    timings["predict"] = time.perf_counter() - t

    t = time.perf_counter()
    sp_zyx = tuple(reversed(ct.GetSpacing()))
    margin = np.ceil(extent / 2 / np.asarray(sp_zyx)).astype(int)
    box = crop_box(roi_arr, margin)
    lo = np.array([b.start for b in box])
    crop_rois = roi_arr[box]
    if not plan.chunked:
        val_maps = blend_maps(crop_rois.shape, sp_zyx, crop_rois, cidx - lo, labels, mean, extent)
        unc_maps = blend_maps(crop_rois.shape, sp_zyx, crop_rois, cidx - lo, labels, sd, extent)
    table = roi_table(mean, labels)
    rel = relative_positions(centres, names)
    subject = subject or subject_from_path(ct_path)
    ras = centres * np.array([-1.0, -1.0, 1.0])
    patch_rows = pd.DataFrame({"subject": subject, "roi": names, "centre_x": ras[:, 0], "centre_y": ras[:, 1],
                               "centre_z": ras[:, 2], "rel_x": rel[:, 0], "rel_y": rel[:, 1], "rel_z": rel[:, 2]})
    for j, p in enumerate(PARAMETERS):
        patch_rows[p] = mean[:, j]
        patch_rows[f"{p}.sd"] = sd[:, j]
    timings["maps"] = time.perf_counter() - t

    diagnosis = _diagnose(patch_rows, diagnosis_model, subject, own_student)
    summary = {
        "subject": subject, "ct": os.path.abspath(ct_path),  # absolute: valid from any folder
        "roi_table": table.to_dict(orient="records"),
        "units": {p: PARAMETER_UNITS[p] for p in PARAMETERS},
        "display_range": display_ranges(meta),
        "model": {"path": os.path.abspath(model_path), **describe(meta),
                  "demo": bool(meta.get("demo", False) or not own_student or trained_on_phantom(meta))},
        "n_patches": int(len(names)), "stride_mm": s.stride_mm, "tta_passes": len(flips), "device": device,
        "bones_from": bones_from, "rois_from": rois_from, **side_info, "ct_resolution": resolution,
        "ct_intensity": intensity,
        "warnings": warns,
        "uncertainty": "standard deviation of the predictions over flipped copies of each patch",
        "background": BACKGROUND, "mask": "rois.nii.gz > 0",
        "centre_frame": "RAS mm in CT space",  # patches.csv's centre_x/y/z, as in a patch store's summary
        "request": request_record(ct_path, meta, s, segmentation, rois_path, diagnosis_model[0], model_path=model_path),
    }
    summary.update(diagnosis)

    t = time.perf_counter()
    shape = roi_arr.shape
    with staged_outputs(out_dir) as stage:
        if plan.chunked:
            planes = max(1, int(plan.slab_budget // (SLAB_BYTES_PER_VOXEL["infer"] * plane_voxels(ct.GetSize()))))
            summary["slab_planes"] = _write_maps_in_slabs(stage, ct, crop_rois, box, shape, sp_zyx, cidx - lo, labels,
                                                          mean, sd, extent, planes)
        else:
            canvas = _MapCanvas(ct, box)
            for j, p in enumerate(PARAMETERS):
                f = PARAMETER_FILE_NAMES[p]
                write_image(canvas.with_map(val_maps[j]), stage / "maps" / f"{f}.nii.gz", level=1)
                write_image(canvas.with_map(unc_maps[j]), stage / "uncertainty" / f"{f}.nii.gz", level=1)
            del canvas
        write_image(rois, stage / "rois.nii.gz", level=1)
        write_image(bones, stage / "bones.nii.gz", level=1)
        table.to_csv(stage / "roi_table.csv", index=False)
        patch_rows.to_csv(stage / "patches.csv", index=False)
        timings["write"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        summary["seconds"] = timings
        write_json(stage / "summary.json", summary)
    _remove_earlier_reports(out_dir)
    return summary


def _remove_earlier_reports(out_dir) -> None:
    """Remove the patient reports that ``ctsma report patient`` wrote into this folder (``report/patient_<subject>``
    ``.pdf``/``.html``) from the results that this run has just replaced: they would show another CT's or run's maps
    and values beside the new ones."""
    from ..report.paths import patient_reports  # the report package's layout, without its matplotlib

    gone = patient_reports(out_dir)
    for f in gone:
        f.unlink()
    if gone:
        progress.info(f"removed the patient report{'s' if len(gone) > 1 else ''} of the earlier results "
                      f"({', '.join(f.name for f in gone)}); run 'ctsma report patient' again for these")


def _write_maps_in_slabs(stage: Path, geom, crop_rois, box, shape, sp_zyx, centres, labels, mean, sd, extent,
                         planes: int) -> int:
    """Blend the value and uncertainty maps ``planes`` z-planes of the ROI box at a time and stream them to their
    files (the same voxels as the whole blend written at once); returns the slab size used."""
    import contextlib

    from ..io.memory import streamed_nifti

    nz = crop_rois.shape[0]
    total = -(-nz // planes)
    with contextlib.ExitStack() as stack:
        writers = {}
        for kind in ("maps", "uncertainty"):
            for p in PARAMETERS:
                path = stage / kind / f"{PARAMETER_FILE_NAMES[p]}.nii.gz"
                writers[kind, p] = stack.enter_context(streamed_nifti(path, geom, level=1))
        for w in writers.values():
            w.write_zeros(box[0].start)
        for i, z0 in enumerate(range(0, nz, planes)):
            z1 = min(z0 + planes, nz)
            for kind, values in (("maps", mean), ("uncertainty", sd)):
                blended = blend_maps(crop_rois.shape, sp_zyx, crop_rois, centres, labels, values, extent, z_range=(z0, z1))
                for j, p in enumerate(PARAMETERS):
                    full = np.full((z1 - z0,) + tuple(shape[1:]), BACKGROUND, np.float32)
                    full[:, box[1], box[2]] = np.nan_to_num(blended[j], nan=BACKGROUND)
                    writers[kind, p].write(full)
                del blended
            progress.step("infer maps", i + 1, total,
                          f"maps slab {i + 1}/{total}: planes {box[0].start + z0}-{box[0].start + z1 - 1}")
        for w in writers.values():
            w.write_zeros(shape[0])
    return planes


def _coarse_copy(ct: sitk.Image, spacing_xyz) -> sitk.Image:
    """``ct`` itself, or a copy resampled to at least ``spacing_xyz`` mm over the same field of view.

    The coarse grid is anchored in patient space (its voxel centres at whole multiples of its spacing along the
    image axes), not on the CT's first voxel: the same knee in a larger or shifted field of view is then sampled
    at the same points, so its bones, ROIs and estimates do not depend on where the field of view starts (with the
    grid anchored on the first voxel, padding a phantom CT with air changed its patch count from 80 to 92)."""
    sp = np.asarray(ct.GetSpacing(), float)
    target = np.maximum(sp, np.asarray(spacing_xyz, float))
    if np.allclose(target, sp):
        return ct
    d = np.asarray(ct.GetDirection(), float).reshape(3, 3)
    lo = d.T @ np.asarray(ct.GetOrigin(), float) - sp / 2            # the field of view, along the image axes
    hi = lo + np.asarray(ct.GetSize()) * sp
    # lattice centres whose voxels cover the whole field of view (the outermost ones reach past it by less than a
    # voxel and take the nearest CT value), so every CT voxel gets a label back
    first = np.floor((lo + target / 2) / target + 1e-6) * target
    last = np.ceil((hi - target / 2) / target - 1e-6) * target
    same = np.isclose(target, sp)
    first[same], last[same] = (lo + sp / 2)[same], (hi - sp / 2)[same]  # an axis kept as it is: the CT's own grid
    size = np.maximum(1, np.round((last - first) / target).astype(int) + 1)
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(v) for v in target))
    ref.SetDirection(ct.GetDirection())
    ref.SetOrigin(tuple(d @ first))
    # Linear resampling without anti-aliasing: bones are far larger than a voxel, and smoothing the full-size
    # CT first would cost more than the segmentation saves.
    return sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32,
                         useNearestNeighborExtrapolator=True)


def _fits_off_grid(rois: sitk.Image, value: int, extent_mm: float, fraction: float) -> bool:
    """Whether a patch holding ``fraction`` of ROI ``value`` fits with its centre on any ROI voxel (a grid of one
    voxel's step): an ROI that the stride's grid gave no such patch is then not too thin, the stride missed it."""
    from ..dataset.sampling import roi_centres

    return roi_centres(rois, value, 0.0, extent_mm, fraction, 10 ** 7, np.random.default_rng(0))[1] > 0


def _to_grid(labels: sitk.Image, ref) -> sitk.Image:
    """Nearest-neighbour copy of a label image on ``ref``'s grid (itself when the grids already agree); ``ref`` is
    an image or a :class:`ctsma.io.memory.Geometry` (only its grid is used).

    Only the part of ``ref``'s grid around the labels' bounding box is resampled, and pasted into an image of
    zeros: the other voxels' nearest label voxels lie outside that box, where every label is 0. The voxels
    resampled are those of a whole-grid resampling, at a fraction of the time on a clinical CT, where the labels
    fill a few percent of the field of view. Only a CT voxel centre exactly half-way between label voxels may take
    the other neighbour, as floating-point rounding decides there (the suite compares both ways)."""
    if same_grid(ref, labels):
        out = sitk.Image(labels)  # (a shallow copy) on exactly ref's grid, as resampling would give
        out.SetSpacing(tuple(ref.GetSpacing()))
        out.SetOrigin(tuple(ref.GetOrigin()))
        out.SetDirection(tuple(ref.GetDirection()))
        return out
    size = [int(v) for v in ref.GetSize()]
    out = sitk.Image(size, sitk.sitkUInt8)
    out.SetSpacing(tuple(ref.GetSpacing()))
    out.SetOrigin(tuple(ref.GetOrigin()))
    out.SetDirection(tuple(ref.GetDirection()))
    arr = sitk.GetArrayViewFromImage(labels)
    if not arr.any():
        return out
    box = crop_box(arr, 1)[::-1]  # (x, y, z), a label voxel of margin
    corners = [labels.TransformContinuousIndexToPhysicalPoint([float(b.start - 0.5 if k else b.stop - 0.5)
                                                               for b, k in zip(box, bits)])
               for bits in np.ndindex(2, 2, 2)]
    ci = np.array([out.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    lo = np.clip(np.floor(ci.min(0)).astype(int) - 1, 0, size)
    hi = np.clip(np.ceil(ci.max(0)).astype(int) + 2, 0, size)
    if np.any(hi <= lo):
        return out  # the labels lie outside ref's field of view
    part = sitk.Resample(labels, [int(v) for v in hi - lo], sitk.Transform(), sitk.sitkNearestNeighbor,
                         out.TransformIndexToPhysicalPoint([int(v) for v in lo]), tuple(ref.GetSpacing()),
                         tuple(ref.GetDirection()), 0, sitk.sitkUInt8)
    out[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])] = part  # pasted in place
    return out


@contextlib.contextmanager
def _kept_warnings(warns: list):
    """Append the messages of the UserWarnings given inside to ``warns`` (summary.json's warnings, which the patient
    report's notes and a batch's status show), and give every warning again, so it is still shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, UserWarning):
            warns.append(str(w.message))
        warnings.warn(w.message, w.category, stacklevel=3)


class progress_stage:
    """Announce a stage on the progress channel (start and end) for callers that follow JSON lines."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total = stage, total

    def __enter__(self):
        progress.emit(self.stage, 0, self.total)
        return self

    def __exit__(self, *exc):
        progress.emit(self.stage, self.total, self.total)
        return False


NO_DIAGNOSIS_FOR_OWN_STUDENT = ("no diagnosis model: the shipped one learnt from the shipped student's parameters; "
                                "give --diagnosis-model, trained on your student's parameters ('ctsma diagnose train')")


def load_diagnosis(diagnosis_path, student_path=None):
    """(path, model) of the diagnosis model ``infer`` will use, or (None, None): loaded before any work, so that a
    bad ``--diagnosis-model`` stops the run at once. Without ``diagnosis_path`` the shipped model serves the shipped
    student only: it learnt from that student's parameters, and another student's would give it meaningless
    input."""
    if diagnosis_path:
        path = Path(diagnosis_path)
    elif student_path is None or _same_file(student_path, default_model_path(must_exist=False)):
        path = default_diagnosis_path()
    else:
        path = None
    if path is None:
        return None, None
    from .. import diagnosis

    return path, diagnosis.load(path)


def _same_file(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _diagnose(patch_rows: pd.DataFrame, loaded, subject: str, own_student: bool) -> dict:
    path, model = loaded
    if path is None:
        return {"diagnosis": None, "diagnosis_note": NO_DIAGNOSIS_FOR_OWN_STUDENT if own_student
                else "no diagnosis model available"}
    from .. import diagnosis

    cv = model.cv_metrics or {}
    # diagnosis.predict holds the rule for a knee without patches in one of the ROIs (no probability, a message
    # naming them), the same for 'ctsma diagnose predict'
    pred = diagnosis.predict(model, patch_rows, subjects=[subject]).iloc[0]
    prob = float(pred["oa_probability"]) if pd.notna(pred["oa_probability"]) else None
    severity = float(pred["severity"]) if pd.notna(pred["severity"]) else None
    message = pred.get("message") or ""
    if prob is None:
        warnings.warn(f"no OA probability: {message}", stacklevel=3)
    shipped = default_diagnosis_path()
    out = {"oa_probability": prob, "severity": severity, "auc": cv.get("auc"), "auc_ci": cv.get("auc_ci"),
           "diagnosis": {"model": os.path.abspath(path), "aggregator": model.metadata.get("aggregator"),
                         "message": message, "cv_metrics": cv,
                         "demo": shipped is not None and _same_file(path, shipped)}}
    if model.metadata.get("reference_ranges"):  # the patient report's non-OA ranges and z-scores
        out["reference_ranges"] = model.metadata["reference_ranges"]
        out["reference_description"] = model.metadata.get("reference_description")
    return out
