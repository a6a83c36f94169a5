"""The registration stages, each a SimpleITK ``ImageRegistrationMethod`` run (ITK is the engine).

Every stage receives the transform so far (``current``: CT points → MR points) and returns a
new full transform. Linear stages optimise a matrix transform that replaces ``current``; the
per-bone and deformable stages optimise a transform applied in CT space before ``current``
(``current ∘ new``). All are multi-resolution, restricted to a mask around the bones and sampled
randomly with a fixed seed, so that the metric of two transforms is compared on the same points.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .blend import blend_rigid, field_grid, field_transform, rigidify
from .masks import centroid


def resolve_metric(name: str, use_synthesis: bool) -> str:
    if name != "auto":
        return name
    return "correlation" if use_synthesis else "mattes_mi"


def _set_metric(reg: sitk.ImageRegistrationMethod, metric: str, bins: int) -> None:
    if metric == "correlation":
        reg.SetMetricAsCorrelation()
    elif metric == "mean_squares":
        reg.SetMetricAsMeanSquares()
    elif metric == "mattes_mi":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    elif metric == "ants_cc":
        reg.SetMetricAsANTSNeighborhoodCorrelation(radius=2)
    else:  # pragma: no cover - presets validate the name
        raise ValueError(metric)


def crop_to_mask(img: sitk.Image, mask: sitk.Image, pad_vox: int = 2) -> tuple[sitk.Image, sitk.Image]:
    """``img`` cropped to the physical bounding box of ``mask`` (which may lie on another grid)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    bb = stats.GetBoundingBox(1)
    corners = [mask.TransformIndexToPhysicalPoint([int(bb[i] + (bb[i + 3] - 1) * c[i]) for i in range(3)])
               for c in np.ndindex(2, 2, 2)]
    idx = np.array([img.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - pad_vox, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + pad_vox + 1, np.asarray(img.GetSize()))
    if np.any(hi <= lo):
        return img, mask
    return sitk.RegionOfInterest(img, [int(v) for v in hi - lo], [int(v) for v in lo]), mask


def _method(metric: str, bins: int, mask: sitk.Image, sampling: float, seed: int,
            shrink=(1,), smooth_mm=(0.0,), max_samples: int = 0) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, metric, bins)
    # Gradients by central differences at the sample points, not a gradient image of the whole volume.
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricFixedMask(mask)
    n_mask = float(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    pct = [float(sampling)] * len(shrink)
    if max_samples:
        pct = [float(min(sampling, max_samples / max(n_mask / s ** 3, 1.0))) for s in shrink]
    reg.SetMetricSamplingStrategy(reg.RANDOM if min(pct) < 1 else reg.NONE)
    reg.SetMetricSamplingPercentagePerLevel(pct, int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smooth_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def evaluate(fixed, moving, transform, *, metric: str, bins: int, mask, sampling: float = 1.0, seed: int = 1) -> float:
    """The metric (lower is better) of ``transform`` over every voxel of ``mask`` on ``fixed``'s grid.

    ITK's ``MetricEvaluate`` ignores sampling, so callers pass a coarse evaluation grid
    (:func:`evaluation_grid`); every voxel of it is used, so two transforms are compared on the same points.
    """
    reg = _method(metric, bins, mask, 1.0, seed)
    reg.SetMovingInitialTransform(transform)
    reg.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
    try:
        value = float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few valid samples: the images no longer overlap
        return float("inf")
    # ITK reports "no valid samples" as the largest double, not as an error: that is no overlap too
    return float("inf") if abs(value) >= NO_SAMPLES else value


NO_SAMPLES = 1e300


def evaluation_grid(img: sitk.Image, spacing_mm: float = 1.2) -> sitk.Image:
    """``img`` averaged onto a coarser grid (whole-voxel bins of about ``spacing_mm``) for QA metrics."""
    f = [max(1, int(round(spacing_mm / s))) for s in img.GetSpacing()]
    return sitk.BinShrink(img, f) if max(f) > 1 else img


def on_grid(mask: sitk.Image, ref: sitk.Image) -> sitk.Image:
    return sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _optimise_linear(reg: sitk.ImageRegistrationMethod, iterations: int, learning_rate: float) -> None:
    # The step halves at every change of direction and the level ends when it drops below 1 % of the
    # first step (about 7 reversals): early stopping that adapts to how noisy the sampled metric is.
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=0.01 * learning_rate,
                                                 numberOfIterations=iterations, relaxationFactor=0.5,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()


def init_translation(fixed_mask: sitk.Image, moving_mask: sitk.Image) -> sitk.Euler3DTransform:
    """Rigid transform (no rotation) taking the fixed mask's centroid to the moving mask's centroid."""
    cf, cm = centroid(fixed_mask), centroid(moving_mask)
    tx = sitk.Euler3DTransform()
    tx.SetCenter(cf.tolist())
    tx.SetTranslation((cm - cf).tolist())
    return tx


def linear_stage(fixed, moving, current: sitk.Transform, cfg, *, metric: str, mask, seed: int,
                 kind: str) -> sitk.Transform:
    """Global rigid (``kind='rigid'``) or affine registration starting from the matrix transform ``current``."""
    if kind == "rigid":
        tx = sitk.Euler3DTransform()
        tx.SetCenter(current.GetCenter())
        tx.SetMatrix(current.GetMatrix())
        tx.SetTranslation(current.GetTranslation())
    else:
        tx = sitk.AffineTransform(3)
        tx.SetCenter(current.GetCenter())
        tx.SetMatrix(current.GetMatrix())
        tx.SetTranslation(current.GetTranslation())
    fixed, mask = crop_to_mask(fixed, mask)
    reg = _method(metric, cfg.bins, mask, cfg.sampling, seed, cfg.shrink, cfg.smooth_mm, cfg.max_samples)
    _optimise_linear(reg, cfg.iterations, cfg.learning_rate)
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed, moving)
    return tx


def bone_rigid(fixed, moving, current: sitk.Transform, cfg, *, metric: str, mask, bone_mask,
               seed: int) -> sitk.Euler3DTransform:
    """A rigid CT→CT motion ``r`` of one bone such that ``current ∘ r`` aligns it."""
    r = sitk.Euler3DTransform()
    r.SetCenter(centroid(bone_mask).tolist())
    fixed, mask = crop_to_mask(fixed, mask)
    reg = _method(metric, cfg.bins, mask, cfg.sampling, seed, cfg.shrink, cfg.smooth_mm, cfg.max_samples)
    _optimise_linear(reg, cfg.iterations, cfg.learning_rate)
    reg.SetMovingInitialTransform(current)
    reg.SetInitialTransform(r, inPlace=True)
    reg.Execute(fixed, moving)
    return r


def per_bone_stage(fixed, moving, current, cfg, *, metric: str, masks: dict, roi_masks: dict, grid_mask,
                   seed: int) -> tuple[sitk.Transform, dict]:
    """Rigid registration of each bone, blended into one field; returns (new transform, per-bone parameters)."""
    rigids, bone_masks, info = [], [], {}
    for name in cfg.bones:
        r = bone_rigid(fixed, moving, current, cfg, metric=metric, mask=roi_masks[name], bone_mask=masks[name],
                       seed=seed)
        rigids.append(r)
        bone_masks.append(masks[name])
        info[name] = {"rotation_deg": np.rad2deg(r.GetParameters()[:3]).round(3).tolist(),
                      "translation_mm": np.round(r.GetParameters()[3:], 3).tolist()}
    ref = field_grid(grid_mask, cfg.field_spacing_mm, cfg.blend_radius_mm)
    field = blend_rigid(ref, bone_masks, rigids, power=cfg.blend_power, radius_mm=cfg.blend_radius_mm,
                        rigid_margin_mm=cfg.rigid_margin_mm)
    return compose(current, field), info


def deformable_stage(fixed, moving, current, cfg, *, metric: str, mask, bone_masks: list, blend_cfg,
                     seed: int) -> sitk.Transform:
    """B-spline registration in CT space before ``current``; bones then made (nearly) rigid again."""
    fixed_c, mask_c = crop_to_mask(fixed, mask)
    extent = np.asarray(fixed_c.GetSize()) * np.asarray(fixed_c.GetSpacing())
    mesh = [max(1, int(round(e / cfg.mesh_mm))) for e in extent]
    bs = sitk.BSplineTransformInitializer(fixed_c, mesh, order=3)
    reg = _method(metric, cfg.bins, mask_c, cfg.sampling, seed, cfg.shrink, cfg.smooth_mm, cfg.max_samples)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=cfg.iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * cfg.iterations)
    reg.SetMovingInitialTransform(current)
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(fixed_c, moving)
    ref = field_grid(mask, blend_cfg.field_spacing_mm, 0.0)
    disp = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        bs, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()))
    disp = rigidify(ref, disp, bone_masks, strength=cfg.bone_rigidity, power=blend_cfg.blend_power,
                    radius_mm=blend_cfg.blend_radius_mm, rigid_margin_mm=blend_cfg.rigid_margin_mm)
    return compose(current, field_transform(ref, disp))


def compose(outer: sitk.Transform, inner: sitk.Transform) -> sitk.CompositeTransform:
    """``outer ∘ inner`` (``inner`` applied first, in CT space), flattened into one composite."""
    out = sitk.CompositeTransform(3)
    parts = []
    for t in (outer, inner):
        if isinstance(t, sitk.CompositeTransform):
            parts += [t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())]
        else:
            parts.append(t)
    for t in parts:  # ITK applies the last added first
        out.AddTransform(t)
    return out
