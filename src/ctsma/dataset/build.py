"""The MR-CT patch-dataset builder (``ctsma dataset build --manifest M --out DIR``).

For each knee (manifest row): ROIs on the CT (the manifest's ``ct_rois``, else from ``ct_bones`` or the
automatic bone segmentation), patch centres on a ``stride_mm`` grid inside each ROI (at most ``max_per_roi``),
a CT patch on the canonical CT grid and an MR patch of the same physical cube through the CT->MR transform on
the canonical MR grid, the MR reference parameters (morphometry engine on the binarised MR patch, inside the
ROI part of the patch), and for the phantom the true parameters of the true microstructure at the same place.

The transform is the **registered** one by default (``--registrations DIR``: ``DIR/<subject>/`` holds the
output of ``ctsma register``, or a manifest column ``registration`` names that folder); a subject whose
registration is missing or whose QA failed is excluded with its reason. ``--transform-column`` uses a transform
file column instead (e.g. the phantom's true ``transform_ct_to_mr``).

Each subject is written as one shard (``DIR/.shards/<subject>.npz``, atomically); a rerun reuses finished shards
with the same settings, so an interrupted build resumes. The shards are then merged into the patch store
(:mod:`ctsma.dataset.store`), whose files appear only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import zipfile
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import PARAMETERS, ROIS, progress
from ..config import setting, to_dict
from ..errors import InputImageError, UserError
from ..io import read_image, safe_join, write_json
from ..io.images import check_ct_intensities
from ..io.tables import side_letter
from ..io.atomic import atomic_path, remove_stale_partials
from ..processes import worker_pool
from ..registration.qa import MIN_BONE_DICE, registration_qa_problem
from .sampling import cut, cut_ct, inside_fraction, relative_positions, roi_centres

log = logging.getLogger(__name__)
SHARD_VERSION = 2  # 2: the per-knee CT record holds the slice thickness


@dataclass
class BuildSettings:
    extent_mm: float = setting(8.0, lo=1.0, hi=64.0, help="physical edge of every patch (mm)")
    ct_size: int = setting(16, lo=4, hi=128, help="CT patch voxels per edge")
    mr_size: int = setting(32, lo=4, hi=256, help="MR patch voxels per edge")
    stride_mm: float = setting(4.0, lo=0.25, hi=64.0, help="spacing of the patch-centre grid in the ROIs (mm)")
    max_per_roi: int = setting(16, lo=1, hi=100000, help="most patches per ROI and subject")
    min_per_roi: int = setting(4, lo=0, hi=100000, help="warn when an ROI has fewer valid patches")
    min_roi_fraction: float = setting(0.5, lo=0.0, hi=1.0, help="least ROI share of a patch cube")
    roi_source: str = setting("manifest", choices=("manifest", "auto"),
                              help="manifest: the ct_rois (else ct_bones) column when present; auto: always segment")
    transform_column: str = setting("", help="manifest column with the CT->MR transform; empty: registered")
    min_bone_dice: float = setting(MIN_BONE_DICE, lo=0.0, hi=1.0, help="registration QA: least femur/tibia Dice")
    mr_threshold: str = setting("bvf", choices=("bvf", "otsu-knee", "otsu-patch"),
                                help="MR reference binarisation: bvf (default; volume-conserving binarisation of "
                                     "the partial-volume bone fraction on a 2x finer grid, per patch), otsu-patch "
                                     "(one Otsu threshold per patch) or otsu-knee (one per knee); on the demo phantom "
                                     "bvf agrees best with the true microstructure (benchmarks/bench_mr_reference.py)")
    truth: bool = setting(True, help="compute true parameters where the phantom can regenerate its truth")
    truth_spacing_mm: float = setting(0.0625, lo=0.01, hi=2.0, help="grid of the true microstructure (mm)")
    truth_extent_mm: float = setting(4.0, lo=0.5, hi=64.0, help="edge of the central cube measured for truth (mm)")
    truth_max_per_roi: int = setting(1, lo=0, hi=100000,
                                     help="patches per ROI and subject that get true parameters (the truth costs "
                                          "~0.8 s a patch at the defaults; the others get NaN)")
    folds: int = setting(5, lo=2, hi=100, help="patient-level folds")
    test_fraction: float = setting(0.2, lo=0.0, hi=0.9, help="share of patients held out as test")
    val_fraction: float = setting(0.2, lo=0.0, hi=0.9, help="share of the other patients used for validation")
    seed: int = setting(0, lo=0, hi=2**31 - 1, help="random seed (centre subsets, splits)")
    ct_edge_sigma_mm: float = setting(0.0, lo=0.0, hi=3.0,
                                      help="blur each CT in-plane to this edge sigma (mm, ctsma.harmonise) before "
                                           "cutting its patches; 0: use the CTs as they are. Set it at least as soft "
                                           "as the cohort's softest CT protocol: the student then sees one sharpness, "
                                           "and inference matches any CT up to it")
    quality: bool = setting(True, help="render quality figures (patch pairs, parameter histograms)")


def subject_key(base: str, row: dict, root: Path, registrations: Path | None) -> str:
    """The key of one subject's cached shard: the settings' ``base`` key, the manifest row, and the size and time of
    every file it names and of its registration (transform and QA record), so that a rerun rebuilds a knee whose
    images or registration changed, or whose registration was removed or now fails its QA."""
    from ..io.atomic import input_stamp
    files = {k: input_stamp(p) for k, v in row.items() if k not in ("subject", "side") and isinstance(v, str) and v
             for p in [_path(root, v)] if p is not None and p.exists()}
    folder = _path(root, row.get("registration"))
    if folder is None and registrations is not None:
        folder = registrations / str(row["subject"])
    if folder is not None:
        files.update({f"registration/{n}": input_stamp(folder / n) for n in ("transform_ct_to_mr.h5", "qa.json")})
    text = json.dumps({"base": base, "row": row, "files": files}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def settings_hash(s: BuildSettings, extra: dict) -> str:
    text = json.dumps({"s": to_dict(s), "x": extra, "v": SHARD_VERSION}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class SubjectExcluded(Exception):
    """A subject cannot be used; the message is the logged reason."""


# ---------------------------------------------------------------- inputs per subject
def _path(root: Path, value) -> Path | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    p = Path(str(value))
    return p if p.is_absolute() else root / p


def load_transform(row: dict, root: Path, s: BuildSettings, registrations: Path | None) -> tuple[sitk.Transform, str]:
    subject = str(row["subject"])
    if s.transform_column:
        p = _path(root, row.get(s.transform_column))
        if p is None:  # said "(None)"
            raise SubjectExcluded(f"the manifest's column {s.transform_column!r} is empty for this knee: it names no "
                                  "transform file")
        if not p.is_file():
            raise SubjectExcluded(f"no transform file in column {s.transform_column!r} ({p})")
        return _read_transform(p), f"column {s.transform_column}"
    folder = _path(root, row.get("registration"))
    named = "the manifest's registration column names it"
    if folder is None and registrations is not None:
        folder = safe_join(registrations, subject)
        named = "its folder in --registrations is named by the manifest's subject"
    if folder is None:
        raise SubjectExcluded("no registration: give --registrations DIR (ctsma register outputs per subject), "
                              "a 'registration' column, or --transform-column")
    tfile, qfile = folder / "transform_ct_to_mr.h5", folder / "qa.json"
    if not folder.is_dir():  # not 'incomplete': a shard not run yet, or registration folders named otherwise
        raise SubjectExcluded(f"not registered: no folder {folder} (register it with 'ctsma register', e.g. the "
                              f"missing --shard; {named})")
    if not tfile.is_file() or not qfile.is_file():
        raise SubjectExcluded(f"registration incomplete in {folder} (needs transform_ct_to_mr.h5 and qa.json)")
    try:
        qa = json.loads(qfile.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SubjectExcluded(f"unreadable registration QA {qfile}: {exc}") from None
    try:
        problem = registration_qa_problem(qa, s.min_bone_dice)
    except (AttributeError, TypeError, ValueError, KeyError):  # not the layout ctsma register writes
        raise SubjectExcluded(f"registration QA {qfile} is not a QA record of 'ctsma register' "
                              "(expected an object with 'stages' and 'bone_dice' per bone)") from None
    if problem:
        raise SubjectExcluded(problem)
    _check_registered_images(qa, row, root, qfile)
    return _read_transform(tfile), f"registered ({folder})"


def _check_registered_images(qa: dict, row: dict, root: Path, qfile: Path) -> None:
    """Exclude a subject whose registration was made from other images than the manifest's (another cohort with
    the same subject names) or from an earlier version of them (a corrected scan): ``ctsma register`` records each
    input's size and modification time (``request.stamps`` in cohort mode, ``inputs.stamps`` for one pair), which
    must still be those of the manifest's files. The paths may differ (a project moved or mounted elsewhere).
    Registrations that record no stamps (before the twenty-fifth session) are not checked."""
    from ..io.atomic import input_stamp
    request = qa.get("request") if isinstance(qa.get("request"), dict) else {}
    inputs = qa.get("inputs") if isinstance(qa.get("inputs"), dict) else {}
    stamps = request.get("stamps") or inputs.get("stamps") or {}
    for k in ("mr", "ct"):
        now = _path(root, row.get(k))
        stamp = input_stamp(now) if now is not None else None
        if stamp is None or not stamps.get(k) or stamps[k] == stamp:  # a missing file: reading it says so
            continue
        recorded = request.get(k) or inputs.get(k)
        moved = not recorded or Path(recorded).resolve() != now.resolve()
        why = (f"was made from another {k.upper()} ({recorded}), not the manifest's {now}" if moved else
               f"is older than its {k.upper()} {now}, which changed since")
        raise SubjectExcluded(f"its registration ({qfile}) {why}; register this knee again")


def _read_transform(path: Path) -> sitk.Transform:
    """An ITK transform file, or the subject excluded with the reason (a damaged or foreign file)."""
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise SubjectExcluded(f"unreadable transform {path}: not an ITK transform file "
                              "(ctsma register writes transform_ct_to_mr.h5)") from None


def load_rois(row: dict, root: Path, ct: sitk.Image, s: BuildSettings) -> tuple[sitk.Image, str]:
    from ..segmentation import read_user_labels, segment_bones, subchondral_rois

    p = _path(root, row.get("ct_rois"))
    if s.roi_source == "manifest" and p is not None:
        return read_user_labels(p, ct, "rois"), "manifest ct_rois"
    bp = _path(root, row.get("ct_bones")) if s.roi_source == "manifest" else None
    side = side_letter(row.get("side"))  # read_manifest checked it
    if bp is not None:
        bones, src = read_user_labels(bp, ct, "bones"), "manifest ct_bones + subchondral_rois"
    else:
        bones, src = segment_bones(ct, side=side), "segment_bones + subchondral_rois"
    return subchondral_rois(ct, bones, side=side), src


# ---------------------------------------------------------------- truth
def _truth_fn():
    try:
        from ..phantom import truth_binary  # type: ignore[attr-defined]
    except ImportError:
        return None
    return truth_binary


def true_patches(knee_dir: Path, transform: sitk.Transform, centres: np.ndarray, s: BuildSettings) -> np.ndarray | None:
    """True bone (n, D, D, D) bool on a ``truth_extent_mm`` cube at ``truth_spacing_mm`` around each centre (CT
    space, like the patches), or None when the phantom cannot regenerate this knee's truth.

    The phantom regenerates its microstructure in an axis-aligned MR-frame box; the box covering the transformed
    cube is generated and sampled (nearest) at the transformed grid points.
    """
    fn = _truth_fn()
    if fn is None or not (knee_dir / "metadata.json").is_file():
        return None
    size = max(4, int(round(s.truth_extent_mm / s.truth_spacing_mm)))
    sp = s.truth_extent_mm / size
    out = np.zeros((len(centres), size, size, size), bool)
    h = 0.5 * s.truth_extent_mm
    corners = np.array([[a, b, c] for a in (-h, h) for b in (-h, h) for c in (-h, h)])
    for i, c in enumerate(centres):
        q = np.array([transform.TransformPoint(tuple(float(v) for v in c + d)) for d in corners])
        lo, hi = q.min(0) - 2 * sp, q.max(0) + 2 * sp
        n = np.ceil((hi - lo) / sp).astype(int) + 1
        binary = np.asarray(fn(knee_dir, tuple(lo), tuple(int(v) for v in n), sp))
        img = sitk.GetImageFromArray(binary.astype(np.uint8))
        img.SetOrigin(tuple(lo))
        img.SetSpacing((sp, sp, sp))
        out[i] = cut(img, c[None], size, s.truth_extent_mm, transform=transform,
                     interpolator=sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)[0] > 0
    return out


# ---------------------------------------------------------------- one subject
MR_BINARISATIONS = {
    "bvf": "bvf: partial-volume bone volume fraction (1 - MR / marrow level: 99th percentile of the patch's ROI, at "
           "least 0.8 of the knee's), 2x supersampled, "
           "thresholded so that binary BV/TV = mean fraction (ctsma.morphometry.bvf_binarise)",
    "otsu-patch": "otsu-patch: bone = normalised MR < the patch's Otsu threshold (bone dark)",
    "otsu-knee": "otsu-knee: bone = normalised MR < the knee's Otsu threshold (bone dark)",
}


def mr_reference_binary(mr_p: np.ndarray, mr_m: np.ndarray, method: str, spacing_mm: float):
    """Bone of MR patches ``(n, z, y, x)`` for the reference morphometry: ``(bone, masks, spacing_zyx, threshold)``.

    ``bvf`` returns patches on a 2x finer grid (and the matching masks and spacing). The patches are
    normalised per knee (marrow about 1), so a patch's marrow level may not fall below 0.8 (the bias field's
    range): a patch whose ROI part lies on a plate would otherwise take bone for marrow.
    """
    from skimage.filters import threshold_otsu

    from ..morphometry import bvf_binarise

    sp = (spacing_mm,) * 3
    if method == "bvf":
        out = [bvf_binarise(p, m > 0 if m.any() else None, supersample=2, min_marrow_level=0.8)[:2]
               for p, m in zip(mr_p, mr_m)]
        return (np.stack([b for b, _ in out]), np.stack([r for _, r in out]).astype(np.uint8),
                tuple(v / 2 for v in sp), float("nan"))
    if method == "otsu-knee":
        thr = float(threshold_otsu(mr_p[mr_m > 0])) if mr_m.any() else float(threshold_otsu(mr_p))
        return mr_p < thr, mr_m, sp, thr
    bone = np.stack([p < threshold_otsu(p[m > 0] if m.any() else p) for p, m in zip(mr_p, mr_m)])
    return bone, mr_m, sp, float("nan")


def build_subject(row: dict, root: Path, s: BuildSettings, registrations: Path | None,
                  rng: np.random.Generator, threads: int | None = None) -> dict:
    """All patches of one knee: arrays and table rows (a shard). Raises :class:`SubjectExcluded`.
    ``threads``: morphometry threads (default: the CPU count)."""
    from ..morphometry import measure_batch

    subject = str(row["subject"])
    transform, tsource = load_transform(row, root, s, registrations)
    try:
        ct = read_image(_path(root, row.get("ct")) or Path("<missing ct>"), what=f"CT of {subject}")
        check_ct_intensities(ct, what=f"CT of {subject}")  # an MR in the ct column would give garbage patches
        mr = read_image(_path(root, row.get("mr")) or Path("<missing mr>"), what=f"MR of {subject}")
        from ..registration.pipeline import check_mr_intensities
        check_mr_intensities(mr, hint="the manifest's mr column must name the MR", what=f"MR of {subject}")
    except InputImageError as exc:
        raise SubjectExcluded(str(exc)) from None
    from ..harmonise import MATCH_TOLERANCE_MM, blurred_crop, inplane_edge_sigma, matching_blur, slice_thickness

    ct_res = inplane_edge_sigma(ct)  # recorded per knee: the model file gets the training CTs' median
    sigma = None if ct_res is None else ct_res["sigma_mm"]
    resolution = {"inplane_edge_sigma_mm": sigma, "spacing_mm": [float(v) for v in ct.GetSpacing()],
                  "slice_thickness_mm": slice_thickness(ct)[0]}
    try:
        rois, rsource = load_rois(row, root, ct, s)
    except UserError as exc:
        raise SubjectExcluded(f"no ROIs: {exc}") from None
    ct_src, warn = ct, []
    if s.ct_edge_sigma_mm > 0:
        if sigma is None:
            raise SubjectExcluded("its in-plane sharpness cannot be measured (no clean air/body edge in the field "
                                  "of view), so it cannot be matched to ct_edge_sigma_mm")
        match = matching_blur(ct, s.ct_edge_sigma_mm, sigma_mm=sigma)
        resolution.update(inplane_edge_sigma_raw_mm=sigma, harmonisation_blur_mm=match["blur_mm"],
                          inplane_edge_sigma_mm=match["sigma_after_mm"])
        if match["blur_mm"] > 0:
            ct_src = blurred_crop(ct, sitk.GetArrayViewFromImage(rois), s.extent_mm, match["blur_mm"])
        elif sigma > s.ct_edge_sigma_mm + MATCH_TOLERANCE_MM:
            warn.append(f"{subject}: its CT is softer in-plane (edge sigma {sigma:.2f} mm) than ct_edge_sigma_mm "
                        f"({s.ct_edge_sigma_mm:.2f} mm) and is used as it is")
    centres, labels = [], []
    for name, value in ROIS.items():
        c, n_valid = roi_centres(rois, value, s.stride_mm, s.extent_mm, s.min_roi_fraction, s.max_per_roi, rng)
        if len(c):
            c = c[inside_fraction(mr, c, s.extent_mm, transform) == 1.0]
        if len(c) < s.min_per_roi:
            warn.append(f"{subject} {name}: only {len(c)} valid patches (< {s.min_per_roi})")
        centres.append(c)
        labels += [name] * len(c)
    centres = np.concatenate(centres) if labels else np.zeros((0, 3))
    if not len(centres):
        raise SubjectExcluded("no valid patch centre in any ROI (ROIs empty, or the MR does not cover them)")
    ct_p = cut_ct(ct_src, centres, s.ct_size, s.extent_mm)
    del ct_src
    mr_p = cut(mr, centres, s.mr_size, s.extent_mm, transform=transform)
    roi_val = np.array([ROIS[n] for n in labels], np.uint8)[:, None, None, None]
    ct_m = (cut(rois, centres, s.ct_size, s.extent_mm, interpolator=sitk.sitkNearestNeighbor,
                pixel_type=sitk.sitkUInt8) == roi_val).astype(np.uint8)
    mr_m = (cut(rois, centres, s.mr_size, s.extent_mm, interpolator=sitk.sitkNearestNeighbor,
                pixel_type=sitk.sitkUInt8) == roi_val).astype(np.uint8)
    # MR normalisation per knee: divide by the 99.5th percentile of the MR inside the ROI patches
    scale = float(np.percentile(mr_p[mr_m > 0], 99.5)) if mr_m.any() else float(np.percentile(mr_p, 99.5))
    scale = scale if scale > 0 else 1.0
    mr_p = mr_p / scale
    bone, bone_masks, mr_sp, thr = mr_reference_binary(mr_p, mr_m, s.mr_threshold, s.extent_mm / s.mr_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mr_par = measure_batch(bone, mr_sp, masks=bone_masks, workers=threads)
    true_par, true_source = None, ""
    if s.truth and s.truth_max_per_roi > 0:
        knee_dir = (_path(root, row.get("ct")) or root).parent
        lab_arr = np.array(labels)
        pick = np.concatenate([np.flatnonzero(lab_arr == n)[:s.truth_max_per_roi] for n in ROIS]).astype(int)
        try:
            tb = true_patches(knee_dir, transform, centres[pick], s) if len(pick) else None
        except Exception as exc:  # a phantom folder from another generator version: no truth, not no dataset
            tb = None
            warn.append(f"{subject}: true microstructure unavailable ({type(exc).__name__}: {exc}); "
                        "true_* from the manifest's per-ROI values")
        if tb is not None:
            tm = (cut(rois, centres[pick], tb.shape[1], s.truth_extent_mm, interpolator=sitk.sitkNearestNeighbor,
                      pixel_type=sitk.sitkUInt8) == roi_val[pick])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp = measure_batch(tb, (s.truth_extent_mm / tb.shape[1],) * 3, masks=tm, workers=threads)
            true_par = {p: np.full(len(labels), np.nan) for p in PARAMETERS}
            for p in PARAMETERS:
                true_par[p][pick] = tp[p]
            true_source = (f"phantom truth_binary, central {s.truth_extent_mm:g}-mm cube at "
                           f"{s.truth_extent_mm / tb.shape[1]:.4f} mm, {s.truth_max_per_roi} patches per ROI")
        elif any(f"true_{r}_{p}" in row for r in ROIS for p in PARAMETERS):
            true_par = {p: np.array([float(row.get(f"true_{n}_{p}", np.nan)) for n in labels]) for p in PARAMETERS}
            true_source = "manifest per-ROI truth"
    ras = centres * np.array([-1.0, -1.0, 1.0])
    rel = relative_positions(centres, labels)  # the same function as CT-only inference
    rows = []
    for i, name in enumerate(labels):
        r = {"subject": subject, "roi": name, "centre_x": ras[i, 0], "centre_y": ras[i, 1], "centre_z": ras[i, 2],
             "rel_x": rel[i, 0], "rel_y": rel[i, 1], "rel_z": rel[i, 2]}
        for p in PARAMETERS:
            r[f"mr_{p}"] = float(mr_par[p][i])
            r[f"true_{p}"] = float(true_par[p][i]) if true_par is not None else float("nan")
        rows.append(r)
    return {"ct": ct_p[:, None], "mr": mr_p[:, None].astype(np.float32), "ct_mask": ct_m[:, None],
            "mr_mask": mr_m[:, None], "rows": rows, "warnings": warn,
            "info": {"transform": tsource, "rois": rsource, "mr_scale": scale, "mr_threshold": thr,
                     "true_source": true_source,
                     "ct_resolution": resolution}}


# ---------------------------------------------------------------- shards
def _write_shard(path: Path, shard: dict, key: str) -> None:
    meta = json.dumps({"rows": shard["rows"], "warnings": shard["warnings"], "info": shard["info"], "key": key},
                      default=float)
    remove_stale_partials(path)  # a run killed while writing this shard left its temporary file
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ct=shard["ct"], mr=shard["mr"], ct_mask=shard["ct_mask"], mr_mask=shard["mr_mask"],
                     meta=np.frombuffer(meta.encode(), np.uint8))


def _read_shard(path: Path, key: str) -> dict | None:
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("key") != key:
                return None
            out = {k: z[k] for k in ("ct", "mr", "ct_mask", "mr_mask")}
    except (OSError, ValueError, KeyError, json.JSONDecodeError, EOFError, zipfile.BadZipFile):  # damaged: rebuilt
        return None
    out.update(meta)
    return out


def assign_splits(subjects: list[str], s: BuildSettings) -> dict[str, tuple[str, int]]:
    """Patient-level split and fold per subject (never by patch): shuffled with the seed."""
    subj = np.array(sorted(subjects))
    rng = np.random.default_rng(s.seed)
    rng.shuffle(subj)
    n = len(subj)
    n_test = int(round(s.test_fraction * n)) if n >= 3 else 0
    rest = n - n_test
    n_val = max(1, int(round(s.val_fraction * rest))) if s.val_fraction > 0 and rest >= 2 else 0
    out = {}
    for i, name in enumerate(subj):
        part = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
        out[str(name)] = (part, int(i % s.folds))
    return out


def read_manifest(path: str | os.PathLike):
    """The cohort manifest (``subject``, ``ct``, ``mr``, ...), read and its subject names checked by
    :func:`ctsma.io.tables.read_table`: every cell as text (a subject "NA" or "nan" is a name, an empty cell is
    ``""``), but the phantom's per-ROI truth ``true_<ROI>_<param>`` as numbers."""
    from ..io.tables import numbers, read_table

    table = read_table(path, "manifest", required=("subject", "ct", "mr"), subjects=True)
    name = f"manifest {Path(path).name}"
    for col in table.columns:
        if col.startswith("true_"):
            table[col] = numbers(table, col, name)
    if "side" in table:  # L/R (or left/right); empty: read from the anatomy. Anything else would be ignored.
        for subject, side in zip(table["subject"], table["side"]):
            try:
                side_letter(side)
            except UserError:
                raise UserError(f"{name}: side {side!r} of subject {subject} is not L or R (leave it empty to read "
                                "it from the anatomy)") from None
    return table


def _build_shard(row: dict, root: Path, s: BuildSettings, registrations: Path | None, path: Path, key: str,
                 threads: int | None = None) -> str | None:
    """Build one subject's shard and write it to ``path``; the reason it was excluded, or None. The subject's
    random stream depends only on the seed and its name, so the order and the process do not matter."""
    subject = str(row["subject"])
    rng = np.random.default_rng([s.seed, int(hashlib.sha1(subject.encode()).hexdigest()[:8], 16)])
    try:
        shard = build_subject(row, root, s, registrations, rng, threads)
    except SubjectExcluded as exc:
        return str(exc)
    _write_shard(path, shard, key)
    return None


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def build_dataset(manifest: str | os.PathLike, out: str | os.PathLike, settings: BuildSettings | None = None, *,
                  registrations: str | os.PathLike | None = None, subjects: list[str] | None = None,
                  workers: int = 1) -> dict:
    """Build (or resume) the patch store in ``out``; returns the summary dict (also in ``out/summary.json``).
    ``workers`` processes build the subjects' shards in parallel (the store is the same for any number)."""
    from .store import PatchStore

    s = settings or BuildSettings()
    if s.mr_size * 1.0 / s.extent_mm <= 0 or s.ct_size < 1:
        raise UserError("patch sizes must be positive")
    table = read_manifest(manifest)
    root = Path(manifest).resolve().parent
    if subjects:
        unknown = sorted(set(map(str, subjects)) - set(table["subject"].astype(str)))
        if unknown:
            raise UserError(f"--subjects: {', '.join(unknown[:10])} not in the manifest {Path(manifest).name}")
        table = table[table["subject"].isin(subjects)]
    from ..io import ensure_writable_dir
    from .store import CSV_NAME, H5_NAME, SUMMARY_NAME

    if registrations and not Path(registrations).is_dir():
        raise UserError(f"--registrations {registrations} is not a folder (the --out of 'ctsma register --manifest')")
    if s.transform_column and s.transform_column not in table:
        raise UserError(f"the manifest has no column {s.transform_column!r} (transform_column); its columns: "
                        f"{', '.join(map(str, table.columns))}")
    foreign = [n for n in (SUMMARY_NAME, CSV_NAME) if (Path(out) / n).is_file()]
    if foreign and not (Path(out) / H5_NAME).is_file():
        raise UserError(f"{out} already holds {' and '.join(foreign)} but no patch store ({H5_NAME}): another "
                        "tool's output (an inference folder has these names too); choose another --out")
    out = ensure_writable_dir(out)  # a clear error for an unusable output folder
    shard_dir = out / ".shards"
    shard_dir.mkdir(exist_ok=True)
    reg = Path(registrations).resolve() if registrations else None
    base = settings_hash(s, {"registrations": str(reg), "manifest": str(Path(manifest).resolve())})
    loaded, excluded, warns = {}, {}, []
    rows = table.to_dict("records")
    paths = {str(r["subject"]): safe_join(shard_dir, f"{r['subject']}.npz") for r in rows}
    keys = {str(r["subject"]): subject_key(base, r, root, reg) for r in rows}
    todo = []
    for row in rows:
        subject = str(row["subject"])
        shard = _read_shard(paths[subject], keys[subject]) if paths[subject].is_file() else None
        if shard is None:
            todo.append(row)
        else:
            loaded[subject] = shard
    if loaded:
        progress.info(f"dataset: {len(loaded)} of {len(rows)} knees already done, {len(todo)} to build")
    jobs = max(1, min(int(workers), len(todo)))

    def finished(subject: str, reason: str | None) -> None:
        shard = _read_shard(paths[subject], keys[subject]) if reason is None else None
        if shard is not None:
            loaded[subject] = shard
        else:
            reason = reason or f"its patches could not be read back from {paths[subject]}"
            excluded[subject] = reason
            log.debug("excluded %s: %s", subject, reason)
            progress.info(f"excluded {subject}: {reason}")

    if jobs == 1:
        for row in progress.track(todo, "dataset: subjects", total=len(todo), unit="knee"):
            subject = str(row["subject"])
            finished(subject, _build_shard(row, root, s, reg, paths[subject], keys[subject]))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with worker_pool(jobs, initializer=_init_worker, initargs=(threads,)) as ex:
            futs = {ex.submit(_build_shard, row, root, s, reg, paths[str(row["subject"])], keys[str(row["subject"])],
                              threads): str(row["subject"]) for row in todo}
            for f in progress.track(as_completed(futs), "dataset: subjects", total=len(futs), unit="knee"):
                finished(futs[f], f.result())
    shards = {str(r["subject"]): loaded[str(r["subject"])] for r in rows if str(r["subject"]) in loaded}
    for shard in shards.values():  # in manifest order, whatever order the workers finished in
        for w in shard["warnings"]:
            warnings.warn(w, stacklevel=2)
            warns.append(w)
    if not rows:
        raise UserError(f"the manifest {Path(manifest).name} lists no subject")
    if not shards:
        raise UserError("no subject could be used; reasons: " + "; ".join(f"{k}: {v}" for k, v in excluded.items()))
    splits = assign_splits(list(shards), s)
    if len(shards) < 3:  # the split has no test patient then: say so now, not when evaluate fails
        w = (f"only {len(shards)} usable knee(s): the split has no test patient, so 'ctsma evaluate' cannot score "
             "this store; training and evaluation need at least 3 knees")
        warnings.warn(w, stacklevel=2)
        warns.append(w)
    else:
        empty = [part for part in ("train", "val") if part not in {v[0] for v in splits.values()}]
        if empty:  # e.g. test_fraction 0.9 of 3 knees: training with the stored split would be refused
            w = (f"the stored split of these {len(shards)} knees has no {' and no '.join(empty)} patient "
                 f"(test_fraction {s.test_fraction:g}, val_fraction {s.val_fraction:g}): 'ctsma train' with it will "
                 "refuse this store; lower the fractions, or train with data.k_folds")
            warnings.warn(w, stacklevel=2)
            warns.append(w)
    attrs = {"ct_spacing_mm": s.extent_mm / s.ct_size, "mr_spacing_mm": s.extent_mm / s.mr_size,
             "extent_mm": s.extent_mm, "mr_normalisation": "MR / 99.5th percentile of the knee's MR in its ROI patches",
             "mr_binarisation": MR_BINARISATIONS[s.mr_threshold],
             "mr_parameters": "ctsma.morphometry.measure_batch inside the ROI part of the MR patch; Tb.N = 1/(Tb.Th+Tb.Sp)",
             "centre_frame": "RAS mm in CT space", "patch_frame": "axis-aligned LPS cube in CT space",
             "settings": to_dict(s), "excluded": excluded,
             "subject_info": {k: v["info"] for k, v in shards.items()}}
    writer = PatchStore.create(out, s.ct_size, s.mr_size, attrs)
    try:
        for subject in progress.track(sorted(shards), "dataset: merge", unit="knee"):
            sh = shards[subject]
            part, fold = splits[subject]
            rws = [dict(r, split=part, fold=fold) for r in sh["rows"]]
            writer.append(sh["ct"], sh["mr"], sh["ct_mask"], sh["mr_mask"], rws)
        store = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    summary = store.summary()
    t = store.table
    summary["patches_per_subject_roi"] = {str(k): {str(r): int(n) for r, n in g["roi"].value_counts().items()}
                                          for k, g in t.groupby("subject")}
    summary["excluded"] = excluded
    summary["warnings"] = warns
    summary["settings"] = to_dict(s)
    summary["splits_by_subject"] = {k: {"split": v[0], "fold": v[1]} for k, v in splits.items()}
    write_json(out / "summary.json", summary)
    if not s.quality:  # an earlier build's figures would show another store
        from .quality import remove_quality
        remove_quality(out / "quality")
        return summary
    try:
        from .quality import render_quality
        render_quality(store, out / "quality")
    except Exception as exc:  # a figure must never lose a finished dataset
        log.warning("quality figures failed: %s", exc)
    return summary
