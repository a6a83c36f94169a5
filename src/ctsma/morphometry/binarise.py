"""Bone/marrow binarisation of grey-level images, with the choices recorded.

* ``modality`` sets the polarity: bone is bright in ``ct`` and ``microct`` and dark in ``mr`` (BFFE);
  ``binary`` means the image is already 0/1 (bone = 1).
* ``method="global"``: one threshold, given or Otsu's (scikit-image) over the ROI.
* ``method="local"``: adaptive (for MR with a bias field): a voxel is bone when it differs from the
  Gaussian-weighted local mean (``window_mm`` is the Gaussian's full width at half maximum) in the bone
  direction by more than ``offset`` (in units of the local mean, default 0).
* ``n4=True`` first removes a smooth bias field with SimpleITK's N4 (mask = ROI), on a shrunk grid.
* ``smooth_sigma_vox`` optionally Gaussian-smooths first (the LHDL reference segmentation uses 1 voxel).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .validate import MorphometryError, check_mask, check_spacing, check_volume

MODALITIES = {"binary": None, "ct": "bright", "microct": "bright", "mr": "dark"}
METHODS = ("global", "local")


def _n4(image: np.ndarray, roi: np.ndarray, spacing_zyx, shrink: int = 2) -> np.ndarray:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(image.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    lo = float(image[roi].min())
    if lo <= 0:  # N4 works on log intensities: shift to strictly positive values
        img = img - lo + 1.0
    msk = sitk.GetImageFromArray(roi.astype(np.uint8))
    msk.CopyInformation(img)
    small = sitk.Shrink(img, [shrink] * 3) if min(image.shape) >= 32 * shrink else img
    small_m = sitk.Shrink(msk, [shrink] * 3) if min(image.shape) >= 32 * shrink else msk
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 40, 30, 20])
    n4.Execute(small, small_m)
    log_field = n4.GetLogBiasFieldAsImage(img)
    corrected = img / sitk.Exp(log_field)
    if lo <= 0:
        corrected = corrected + lo - 1.0
    return sitk.GetArrayFromImage(corrected).astype(np.float32)


def binarise(image, spacing_zyx=None, mask=None, *, modality: str = "microct", threshold=None,
             method: str = "global", n4: bool = False, window_mm: float | None = None, offset: float = 0.0,
             smooth_sigma_vox: float = 0.0):
    """Binarise ``image`` (z, y, x array or SimpleITK image) into bone (True) and marrow.

    Returns ``(bone, info)`` where ``info`` = ``{"method", "threshold", "polarity", "n4", ...}`` records
    every choice; ``threshold`` is ``None`` (Otsu), ``"otsu"`` or a number in image units.
    """
    image, spacing_zyx = _as_array(image, spacing_zyx)
    sp = check_spacing(spacing_zyx)
    if modality not in MODALITIES:
        raise MorphometryError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if method not in METHODS:
        raise MorphometryError(f"unknown binarisation method {method!r}; use 'global' or 'local'")
    arr = check_volume(image)
    roi = check_mask(mask, arr.shape)
    polarity = MODALITIES[modality]
    if polarity is None:
        vals = np.unique(arr)
        if not np.isin(vals, (0, 1)).all():
            raise MorphometryError("modality 'binary' needs an image of 0 and 1 only; for a grey-level image "
                                   "give --modality ct, microct or mr")
        return arr.astype(bool), {"method": "given", "threshold": None, "polarity": "bone=1", "n4": False,
                                  "modality": modality}
    work = arr.astype(np.float32)
    info = {"modality": modality, "polarity": "bone bright" if polarity == "bright" else "bone dark",
            "n4": bool(n4), "smooth_sigma_vox": float(smooth_sigma_vox)}
    if n4:
        work = _n4(work, roi, sp)
    if smooth_sigma_vox > 0:
        work = ndimage.gaussian_filter(work, smooth_sigma_vox)
    inside = work[roi]
    if float(inside.max()) == float(inside.min()):
        raise MorphometryError("the image is constant inside the ROI: nothing to threshold")
    if method == "global":
        if threshold is None or threshold == "otsu":
            from skimage.filters import threshold_otsu
            thr = float(threshold_otsu(inside))
            info["method"] = "global-otsu"
        else:
            thr = _number(threshold)
            info["method"] = "global-given"
        bone = work > thr if polarity == "bright" else work < thr
        info["threshold"] = thr
    else:
        if threshold not in (None, "otsu"):
            raise MorphometryError("a local (adaptive) binarisation takes no fixed threshold; use offset instead")
        w = float(window_mm) if window_mm is not None else 16 * min(sp)
        if not np.isfinite(w) or w <= 0:
            raise MorphometryError(f"window_mm must be > 0, got {window_mm}")
        sigma = [w / 2.3548 / s for s in sp]
        # local mean of the ROI only (normalised convolution), so the ROI edge does not bias it
        num = ndimage.gaussian_filter(np.where(roi, work, 0).astype(np.float32), sigma)
        den = ndimage.gaussian_filter(roi.astype(np.float32), sigma)
        local = num / np.maximum(den, 1e-6)
        scale = np.abs(local) + 1e-12
        rel = (work - local) / scale
        bone = rel > offset if polarity == "bright" else rel < -offset
        info.update({"method": "local-gaussian-mean", "threshold": None, "window_mm": w, "offset": float(offset)})
    return np.asarray(bone, bool), info


def _number(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MorphometryError(f"threshold must be a number or 'otsu', got {value!r}") from None
    if not np.isfinite(v):
        raise MorphometryError(f"threshold must be finite, got {value!r}")
    return v


def _as_array(image, spacing_zyx):
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover
        sitk = None
    if sitk is not None and isinstance(image, sitk.Image):
        if image.GetDimension() != 3:
            from ..errors import InputImageError
            raise InputImageError(f"image is {image.GetDimension()}D; a 3D volume is required")
        sp = tuple(image.GetSpacing())[::-1]
        if spacing_zyx is not None and not np.allclose(sp, spacing_zyx):
            raise MorphometryError(f"spacing {tuple(spacing_zyx)} (z, y, x) contradicts the image's own spacing {sp}")
        return sitk.GetArrayFromImage(image), sp
    if spacing_zyx is None:
        raise MorphometryError("a numpy image needs its spacing (z, y, x) in mm")
    return np.asarray(image), spacing_zyx
