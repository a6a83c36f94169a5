"""Phantom settings: presets, typed validation and the micro-structure design check."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from ..config import load_config, setting, to_dict
from ..errors import ConfigError

GENERATOR_VERSION = "1.2.0"
"""Bumped whenever the same seed and settings would give different files."""


@dataclass
class PhantomSettings:
    preset: str = setting("demo", choices=("demo", "full"), help="image sizes and truth resolution")
    # MR (BFFE, sagittal slices along x): spacing and field of view, (x, y, z) mm
    mr_spacing: tuple[float, float, float] = setting((0.6, 0.3, 0.3), lo=0.05, hi=2.0)
    mr_fov: tuple[float, float, float] = setting((84.0, 66.0, 36.0), lo=5.0, hi=400.0)
    mr_subsample_mm: float = setting(0.15, lo=0.01, hi=0.5, help="fine-grid step for MR partial volume")
    mr_psf_fwhm_vox: float = setting(1.2, lo=0.0, hi=4.0, help="Gaussian PSF FWHM in voxels")
    mr_snr: float = setting(22.0, lo=2.0, hi=1000.0, help="marrow signal / Rician sigma")
    mr_bias: float = setting(0.2, lo=0.0, hi=0.8, help="peak relative amplitude of the bias field")
    # CT (axial slices along z of the scanner)
    ct_spacing: tuple[float, float, float] = setting((0.6, 0.6, 1.0), lo=0.05, hi=3.0)
    ct_fov: tuple[float, float, float] = setting((150.0, 150.0, 60.0), lo=5.0, hi=600.0)
    ct_subsample_mm: float = setting(0.3, lo=0.01, hi=1.0, help="fine-grid step for CT partial volume")
    ct_psf_fwhm_mm: tuple[float, float, float] = setting((0.9, 0.9, 1.3), lo=0.0, hi=5.0)
    ct_noise_hu: float = setting(22.0, lo=0.0, hi=200.0, help="quantum noise SD in HU (before PSF)")
    # truth microstructure
    truth_spacing: float = setting(0.04, lo=0.005, hi=0.2, help="isotropic truth-grid voxel, mm")
    truth_patch_mm: float = setting(2.4, lo=0.5, hi=10.0, help="edge of each truth patch cube, mm")
    truth_patches_per_roi: int = setting(3, lo=1, hi=64)
    tb_th: float = setting(0.16, lo=0.01, hi=2.0, help="healthy target Tb.Th, mm")
    tb_sp: float = setting(0.70, lo=0.05, hi=5.0, help="healthy target Tb.Sp, mm")
    bvtv: float = setting(0.22, lo=0.0, hi=1.0, help="healthy target BV/TV")
    # transforms
    field_spacing: float = setting(2.5, lo=0.5, hi=10.0, help="displacement-field grid step, mm")


PRESETS = {
    "demo": {},
    "full": {
        "mr_spacing": (0.5, 0.25, 0.25), "mr_fov": (90.0, 70.0, 40.0), "mr_subsample_mm": 0.0833,
        "ct_spacing": (0.5, 0.5, 0.8), "ct_fov": (160.0, 160.0, 70.0), "ct_subsample_mm": 0.1667,
        "truth_spacing": 0.03, "truth_patch_mm": 3.0, "truth_patches_per_roi": 6, "field_spacing": 2.0,
    },
}


MAX_TRUTH_VOXELS = 16_000_000
"""Voxels of one truth cube (the demo's 2.4 mm at 0.04 mm: 0.2 M; the full preset's 3 mm at 0.03 mm: 1 M); the local
thickness of a random structure of the limit took 0.9 GB and 6 s here (measure_binary), per cube and process."""


def make_settings(preset: str = "demo", overrides: dict | None = None) -> PhantomSettings:
    """Settings of a preset with optional overrides; every value is checked before any work."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    data = dict(PRESETS[preset])
    data["preset"] = preset
    data.update(overrides or {})
    s = load_config(data, PhantomSettings)
    check_settings(s)
    return s


def check_settings(s: PhantomSettings) -> None:
    """Refuse settings that cannot work (consistency beyond single-value ranges)."""
    for name in ("mr_spacing", "mr_fov", "ct_spacing", "ct_fov"):
        v = getattr(s, name)
        if len(v) != 3 or any((not math.isfinite(x)) or x <= 0 for x in v):
            raise ConfigError(f"{name} must be three positive numbers (x, y, z mm), got {v!r}")
    for img in ("mr", "ct"):
        sp, fov = getattr(s, f"{img}_spacing"), getattr(s, f"{img}_fov")
        n = [int(round(f / d)) for f, d in zip(fov, sp)]
        if min(n) < 8:
            raise ConfigError(f"{img}_fov {fov} is smaller than 8 voxels of {img}_spacing {sp} along an axis")
        if math.prod(n) > 60e6:
            raise ConfigError(f"{img} image would have {math.prod(n) / 1e6:.0f} M voxels (limit 60 M); "
                              f"use a larger {img}_spacing or a smaller {img}_fov")
    if s.mr_subsample_mm > min(s.mr_spacing) or s.ct_subsample_mm > min(s.ct_spacing):
        raise ConfigError("mr_subsample_mm/ct_subsample_mm must not exceed the image voxel size")
    if s.truth_spacing * 16 > s.truth_patch_mm:
        raise ConfigError(f"truth_patch_mm ({s.truth_patch_mm}) must hold at least 16 truth voxels "
                          f"of truth_spacing ({s.truth_spacing})")
    n_truth = round(s.truth_patch_mm / s.truth_spacing) ** 3
    if n_truth > MAX_TRUTH_VOXELS:  # measured per cube after the images are made: refused before any work instead
        raise ConfigError(f"each truth cube would have {n_truth / 1e6:.0f} M voxels (truth_patch_mm / truth_spacing "
                          f"= {s.truth_patch_mm / s.truth_spacing:.0f} per edge; limit {MAX_TRUTH_VOXELS / 1e6:.0f} M, "
                          "about 250 per edge); use a smaller truth_patch_mm or a larger truth_spacing")
    if s.truth_spacing > s.tb_th / 2.5:
        raise ConfigError(f"truth_spacing {s.truth_spacing} mm is too coarse for tb_th {s.tb_th} mm "
                          f"(need at least 2.5 voxels across a trabecula: truth_spacing <= {s.tb_th / 2.5:.3f})")
    from .subject import micro_design  # raises ConfigError for impossible BV/TV
    micro_design(s.bvtv, s.tb_th, s.tb_sp)


def settings_dict(s: PhantomSettings) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in to_dict(s).items()}


def settings_hash(s: PhantomSettings) -> str:
    text = json.dumps({"version": GENERATOR_VERSION, **settings_dict(s)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def from_dict(d: dict) -> PhantomSettings:
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return load_config(d, PhantomSettings)


__all__ = ["PhantomSettings", "PRESETS", "make_settings", "check_settings", "settings_dict", "settings_hash",
           "from_dict", "GENERATOR_VERSION"]
