"""Multi-stage MR→CT registration: stages in order, each checked and kept only if it helps.

:func:`register` runs the stages of a :class:`~ctsma.registration.presets.Preset` on a CT (fixed)
and an MR (moving) — or the MR's pseudo-CT from a synthesis model — and returns one transform
mapping CT points to MR points with a QA record per stage. :func:`write_outputs` writes the
contract files (``transform_ct_to_mr.h5``, ``mr_in_ct.nii.gz``, ``pseudo_ct_in_ct.nii.gz``,
``qa.json``) and a checkerboard image, each atomically, ``qa.json`` last.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import BONES, __version__
from ..errors import InputImageError
from ..io.atomic import atomic_path, remove_stale_outputs, staged_outputs, write_json
from ..io.images import check_ct_intensities, check_image, write_image
from . import stages as st
from .masks import body_mask, dice, dilate_mm, label_mask, threshold_bones, validate_bones
from .presets import Preset, load_preset

STAGE_ORDER = ("init", "rigid", "affine", "per_bone", "deformable")


@dataclass
class StageRecord:
    name: str
    metric: str
    metric_before: float
    metric_after: float
    kept: bool
    seconds: float
    bone_dice: dict = field(default_factory=dict)
    warning: str | None = None
    details: dict = field(default_factory=dict)


@dataclass
class RegistrationResult:
    transform: sitk.Transform
    stages: list[StageRecord]
    seconds: float
    preset: Preset
    pseudo_ct: sitk.Image | None = None
    bone_dice: dict = field(default_factory=dict)

    def qa(self) -> dict:
        return {"ctsma_version": __version__, "preset": self.preset.name,
                "use_synthesis": self.preset.use_synthesis,
                "stages": [vars(s) for s in self.stages],
                "bone_dice": self.bone_dice, "total_seconds": self.seconds,
                "settings": self.preset.to_dict()}


def check_mr_intensities(mr: sitk.Image, hint: str = "give the MR first and the CT second", what: str = "MR") -> None:
    """Refuse what is not an MR: a CT in HU (a magnitude MR is never negative, while a CT's air (-1000) and fat
    (about -100) are; ``hint`` ends the message; a normalised MR (z-scores) stays far above -50), and a label image
    (:func:`check_not_labels`; ``what`` names the image there)."""
    arr = sitk.GetArrayViewFromImage(mr)
    lo = float(np.percentile(arr.ravel()[:: max(1, arr.size // 1_000_000)], 0.5))
    if lo < -50:
        raise InputImageError(f"MR intensities go down to {lo:.0f}, like a CT in Hounsfield units; {hint}")
    check_not_labels(mr, what)


def check_not_labels(img: sitk.Image, what: str) -> None:
    """Refuse a label image (a handful of whole values, such as mr_rois.nii.gz) where an intensity image belongs:
    a dataset's 'MR reference' would be morphometry of label edges, a pseudo-CT would be made from labels."""
    arr = sitk.GetArrayViewFromImage(img).ravel()
    pick = np.random.default_rng(0).integers(0, arr.size, min(arr.size, 200_000))  # no stride: rows alias
    values = np.unique(arr[pick])
    if len(values) <= 16 and np.all(values == np.round(values)):
        raise InputImageError(f"{what} holds only the values {', '.join(f'{v:g}' for v in values)}: a label image, "
                              "not an MR")


def automatic_bones(ct: sitk.Image) -> sitk.Image:
    """CT bone labels when none are given: ``ctsma.segmentation``, else the threshold fallback."""
    from ..segmentation.bones import BothKneesError

    try:
        from ..segmentation import segment_bones
        return segment_bones(ct)
    except ImportError:  # pragma: no cover - segmentation ships with the package
        return threshold_bones(ct)
    except BothKneesError as exc:  # both knees' thresholded bones would pull the MR's knee half-way
        raise InputImageError(str(exc).split(";")[0] + "; give the bones of the knee the MR shows (--ct-bones), "
                              "or crop the CT to that knee") from None
    except InputImageError:
        return threshold_bones(ct)


def _pseudo_ct_bones(pseudo_ct) -> sitk.Image | None:
    """Bone labels of the pseudo-CT by the CT segmentation (threshold fallback), or None (no pseudo-CT, or no bone
    found in it). The threshold alone fails where femur and tibia touch at the pseudo-CT's resolution."""
    if pseudo_ct is None:
        return None
    try:
        return automatic_bones(pseudo_ct)
    except InputImageError:
        return None


def _dice(ct_bones, mr_labels, transform, names) -> dict:
    if mr_labels is None:
        return {}
    """Dice per bone on the CT grid ``ct_bones``, counting only voxels that map inside the MR."""
    warped = sitk.Resample(mr_labels, ct_bones, transform, sitk.sitkNearestNeighbor, 255, sitk.sitkUInt8)
    inside = warped != 255
    out = {n: dice((ct_bones == BONES[n]) * inside, warped == BONES[n]) for n in names}
    vals = [v for v in out.values() if np.isfinite(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


def register(mr: sitk.Image, ct: sitk.Image, *, preset: Preset | str = "default", ct_bones: sitk.Image | None = None,
             pseudo_ct: sitk.Image | None = None, synthesis: Callable[[sitk.Image], sitk.Image] | None = None,
             mr_bones: sitk.Image | None = None, report: Callable[[StageRecord], None] | None = None
             ) -> RegistrationResult:
    """Register ``mr`` (moving) to ``ct`` (fixed). Returns the CT→MR transform and per-stage QA; ``report`` is
    called with each stage's record as the stage ends (the command line's progress).

    With ``preset.use_synthesis`` the moving image is ``pseudo_ct`` (the MR's pseudo-CT on the MR's
    frame) or ``synthesis(mr)``; otherwise the raw MR with mutual information. ``ct_bones`` holds
    femur=1 / tibia=2 in CT space (a threshold fallback is used without it). ``mr_bones`` (optional,
    MR space) only makes the bone Dice of the QA exact; without it the pseudo-CT's bones are used.
    """
    t_start = time.perf_counter()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's console warnings; problems surface as errors
    preset = load_preset(preset) if not isinstance(preset, Preset) else preset
    if preset.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(preset.threads)
    ct = check_image(ct, what="CT")
    mr = check_image(mr, what="MR")
    check_ct_intensities(ct)
    check_mr_intensities(mr)  # a CT, or mr_rois/mr_bones given as the MR (else registered with bone Dice 0, exit 3)
    names = list(preset.per_bone.bones) if preset.per_bone.enabled else ["femur", "tibia"]
    ct_bones = validate_bones(ct_bones, ct, names=names) if ct_bones is not None else automatic_bones(ct)

    moving = mr
    if preset.use_synthesis:
        if pseudo_ct is None:
            if synthesis is None:
                raise InputImageError("this preset registers a pseudo-CT: give a synthesis model (--model), "
                                      "or use a preset with \"use_synthesis\": false")
            pseudo_ct = synthesis(mr)
        moving = check_image(pseudo_ct, what="pseudo-CT")
    # the bone-centroid initialisation uses only what registration sees (the pseudo-CT's bones); MR bone labels,
    # when given, only make the QA's bone Dice exact (on the phantom they are ground truth)
    pseudo_bones = _pseudo_ct_bones(pseudo_ct)
    mr_labels = sitk.Cast(mr_bones, sitk.sitkUInt8) if mr_bones is not None else pseudo_bones

    masks = {n: label_mask(ct_bones, [n]) for n in names}
    union = label_mask(ct_bones, names)
    # Masks that bound metrics and the QA live on a coarser grid (fast dilation, fixed evaluation points).
    ct_ev = st.evaluation_grid(ct, preset.qa_spacing_mm)
    bones_ev = st.on_grid(ct_bones, ct_ev)
    union_ev = label_mask(bones_ev, names)
    records: list[StageRecord] = []
    current: sitk.Transform = sitk.Euler3DTransform()
    current.SetCenter(st.centroid(union).tolist())

    def run(name, cfg_metric, bins, eval_mask, sampling, fn):
        nonlocal current
        metric = st.resolve_metric(cfg_metric, preset.use_synthesis)
        t0 = time.perf_counter()
        ev = dict(metric=metric, bins=bins, mask=eval_mask)
        before = st.evaluate(ct_ev, moving, current, **ev)
        details = {}
        new = fn(metric)
        if isinstance(new, tuple):
            new, details = new
        after = st.evaluate(ct_ev, moving, new, **ev)
        kept = bool(np.isfinite(after) and (after <= before or not preset.reject_worse or not np.isfinite(before)))
        warn = None
        if not kept:
            warn = (f"stage {name} made the {metric} metric worse ({before:.5g} → {after:.5g}); "
                    "its result was rejected and the previous stage's result kept")
            warnings.warn(warn, stacklevel=2)
        else:
            current = new
        records.append(StageRecord(name, metric, before, after, kept, 0.0,
                                   _dice(bones_ev, mr_labels, current, names), warn, details))
        records[-1].seconds = time.perf_counter() - t0
        if report is not None:
            report(records[-1])

    lin = preset.rigid if preset.rigid.enabled else preset.affine
    glob_mask = dilate_mm(union_ev, lin.mask_margin_mm)
    if preset.init.enabled:
        method = preset.init.method
        if method == "auto":
            method = "bone_centroid" if preset.use_synthesis else "body_centroid"

        def do_init(_metric):
            how = method
            if how == "bone_centroid":
                if pseudo_bones is not None:
                    return st.init_translation(union, label_mask(pseudo_bones, names))
                why = "no bones found in the pseudo-CT" if pseudo_ct is not None else "no pseudo-CT to find bones in"
                warnings.warn(f"{why}; initialising from body centroids instead", stacklevel=2)
                how = "body_centroid"
            if how == "body_centroid":
                return st.init_translation(body_mask(ct, is_ct=True), body_mask(moving, is_ct=preset.use_synthesis))
            c_ct = np.asarray(ct.TransformContinuousIndexToPhysicalPoint((np.asarray(ct.GetSize()) - 1) / 2))
            c_mr = np.asarray(moving.TransformContinuousIndexToPhysicalPoint((np.asarray(moving.GetSize()) - 1) / 2))
            tx = sitk.Euler3DTransform()
            tx.SetCenter(st.centroid(union).tolist())
            tx.SetTranslation((c_mr - c_ct).tolist())
            return tx
        run("init", lin.metric, lin.bins, glob_mask, lin.sampling, do_init)
    _check_overlap(ct_ev, moving, current, glob_mask)
    for kind in ("rigid", "affine"):
        cfg = getattr(preset, kind)
        if cfg.enabled:
            m = dilate_mm(union_ev, cfg.mask_margin_mm)
            run(kind, cfg.metric, cfg.bins, m, cfg.sampling,
                lambda metric, cfg=cfg, m=m, kind=kind: st.linear_stage(ct, moving, current, cfg, metric=metric,
                                                                         mask=m, seed=preset.seed, kind=kind))
    pb = preset.per_bone
    if pb.enabled:
        rois = {n: dilate_mm(label_mask(bones_ev, [n]), pb.mask_margin_mm) for n in names}
        pb_union = dilate_mm(union_ev, pb.mask_margin_mm)
        run("per_bone", pb.metric, pb.bins, pb_union, pb.sampling,
            lambda metric: st.per_bone_stage(ct, moving, current, pb, metric=metric, masks=masks, roi_masks=rois,
                                             grid_mask=union, seed=preset.seed))
    de = preset.deformable
    if de.enabled:
        m = dilate_mm(union_ev, de.mask_margin_mm)
        run("deformable", de.metric, de.bins, m, de.sampling,
            lambda metric: st.deformable_stage(ct, moving, current, de, metric=metric, mask=m,
                                               bone_masks=[masks[n] for n in names], blend_cfg=pb, seed=preset.seed))
    final = current if isinstance(current, sitk.CompositeTransform) else st.compose(current, sitk.Transform())
    result = RegistrationResult(final, records, time.perf_counter() - t_start, preset,
                                pseudo_ct if preset.use_synthesis else None)
    result.bone_dice = records[-1].bone_dice if records else _dice(bones_ev, mr_labels, final, names)
    return result


def register_transform(mr: sitk.Image, ct: sitk.Image, preset: Preset | str, ct_bones: sitk.Image | None = None,
                       pseudo_ct: sitk.Image | None = None) -> sitk.Transform:
    """:func:`register`'s CT→MR transform alone: a module-level function that worker processes can run."""
    return register(mr, ct, preset=preset, ct_bones=ct_bones, pseudo_ct=pseudo_ct).transform


def overlap_fraction(fixed: sitk.Image, mask: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                     n: int = 2000, seed: int = 0) -> float:
    """Share of (up to ``n`` random) mask points of the fixed grid that ``transform`` maps inside ``moving``."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]
    if len(idx) > n:
        idx = idx[np.random.default_rng(seed).choice(len(idx), n, replace=False)]
    size = np.asarray(moving.GetSize())
    inside = 0
    for i in idx.tolist():
        q = moving.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(
            fixed.TransformIndexToPhysicalPoint(i)))
        inside += bool(np.all(np.asarray(q) >= -0.5) and np.all(np.asarray(q) <= size - 0.5))
    return inside / max(len(idx), 1)


def _check_overlap(ct, moving, transform, mask) -> None:
    if overlap_fraction(ct, mask, moving, transform) < 0.05:
        raise InputImageError("the MR and the CT do not overlap in physical space, even after initialisation "
                              "(are they scans of the same knee? check their origins/orientation)")


def resample_to_ct(img: sitk.Image, ct: sitk.Image, transform: sitk.Transform, default: float) -> sitk.Image:
    return sitk.Resample(img, ct, transform, sitk.sitkLinear, float(default), sitk.sitkFloat32)


def checkerboard_png(ct: sitk.Image, warped: sitk.Image, path: Path, *, mr_like: bool) -> Path:
    """Checkerboard of CT and the registered image on the three central planes (a picture for a person)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = sitk.GetArrayFromImage(ct).astype(np.float32)
    b = sitk.GetArrayFromImage(warped).astype(np.float32)
    na = np.clip((a + 200) / 1700, 0, 1)
    if mr_like:
        hi = np.percentile(b, 99.5) or 1.0
        nb = np.clip(b / hi, 0, 1)
    else:
        nb = np.clip((b + 200) / 1700, 0, 1)
    sp = np.asarray(ct.GetSpacing())[::-1]  # z, y, x
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    c = np.asarray(a.shape) // 2
    views = [(na[c[0]], nb[c[0]], sp[1] / sp[2], "axial"), (na[:, c[1]], nb[:, c[1]], sp[0] / sp[2], "coronal"),
             (na[:, :, c[2]], nb[:, :, c[2]], sp[0] / sp[1], "sagittal")]
    for ax, (u, v, aspect, title) in zip(axes, views):
        tile = max(4, min(u.shape) // 8)
        yy, xx = np.indices(u.shape)
        board = np.where(((yy // tile) + (xx // tile)) % 2 == 0, u, v)
        ax.imshow(board, cmap="gray", origin="lower", aspect=aspect)
        ax.set_title(f"{title}: CT / {'MR' if mr_like else 'pseudo-CT'} checkerboard")
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


def write_outputs(result: RegistrationResult, mr: sitk.Image, ct: sitk.Image, out_dir: str | Path, *,
                  extra_qa: dict | None = None) -> dict:
    """Write the contract files into ``out_dir``: all written in a staging folder, then moved in with ``qa.json``
    (which marks completion) last, so an interrupted run leaves none of its files, and an earlier run's
    pseudo-CT files that this run does not replace are removed."""
    with staged_outputs(out_dir, marker="qa.json") as stage:
        with atomic_path(stage / "transform_ct_to_mr.h5") as tmp:
            sitk.WriteTransform(result.transform, str(tmp))
        mr_in_ct = resample_to_ct(mr, ct, result.transform, 0.0)
        write_image(mr_in_ct, stage / "mr_in_ct.nii.gz")
        files = {"transform": "transform_ct_to_mr.h5", "mr_in_ct": "mr_in_ct.nii.gz"}
        if result.pseudo_ct is not None:
            pct = resample_to_ct(result.pseudo_ct, ct, result.transform, -1000.0)
            write_image(pct, stage / "pseudo_ct_in_ct.nii.gz")
            files["pseudo_ct_in_ct"] = "pseudo_ct_in_ct.nii.gz"
            checkerboard_png(ct, pct, stage / "checkerboard_pseudo_ct.png", mr_like=False)
            files["checkerboard_pseudo_ct"] = "checkerboard_pseudo_ct.png"
        checkerboard_png(ct, mr_in_ct, stage / "checkerboard_mr.png", mr_like=True)
        files["checkerboard_mr"] = "checkerboard_mr.png"
        qa = result.qa()
        qa["files"] = files
        if extra_qa:
            qa.update(extra_qa)
        write_json(stage / "qa.json", qa)
    remove_stale_outputs(out_dir, ("pseudo_ct_in_ct.nii.gz", "checkerboard_pseudo_ct.png"), files.values())
    return qa
