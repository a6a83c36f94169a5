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


def _method(metric: str, bins: int, mask: sitk.Image, sampling: float, seed: int,
            shrink=(1,), smooth_mm=(0.0,)) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    _set_metric(reg, metric, bins)
    reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM if sampling < 1 else reg.NONE)
    reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smooth_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def evaluate(fixed, moving, transform, *, metric: str, bins: int, mask, sampling: float, seed: int) -> float:
    """The metric (lower is better) of ``transform`` over ``mask``, at full resolution, fixed sampling."""
    reg = _method(metric, bins, mask, max(sampling, 0.05), seed)
    reg.SetMovingInitialTransform(transform)
    reg.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few valid samples: the images no longer overlap
        return float("inf")


def _optimise_linear(reg: sitk.ImageRegistrationMethod, iterations: int, learning_rate: float) -> None:
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-3,
                                                 numberOfIterations=iterations, relaxationFactor=0.6,
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
    reg = _method(metric, cfg.bins, mask, cfg.sampling, seed, cfg.shrink, cfg.smooth_mm)
    _optimise_linear(reg, cfg.iterations, cfg.learning_rate)
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed, moving)
    return tx


def bone_rigid(fixed, moving, current: sitk.Transform, cfg, *, metric: str, mask, bone_mask,
               seed: int) -> sitk.Euler3DTransform:
    """A rigid CT→CT motion ``r`` of one bone such that ``current ∘ r`` aligns it."""
    r = sitk.Euler3DTransform()
    r.SetCenter(centroid(bone_mask).tolist())
    reg = _method(metric, cfg.bins, mask, cfg.sampling, seed, cfg.shrink, cfg.smooth_mm)
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
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(e / cfg.mesh_mm))) for e in extent]
    bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(metric, cfg.bins, mask, cfg.sampling, seed, cfg.shrink, cfg.smooth_mm)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=cfg.iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * cfg.iterations)
    reg.SetMovingInitialTransform(current)
    reg.SetInitialTransform(bs, inPlace=True)
    reg.Execute(fixed, moving)
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
