"""Registration presets: JSON files in ``Resources/Presets/registration/`` with typed, validated settings.

A preset names which stages run and how. Stages run in a fixed order: ``init`` (physical-space
initialisation from mask centroids), ``rigid``, ``affine``, ``per_bone`` (rigid per bone, blended
into one displacement field) and ``deformable`` (B-spline with the bones kept rigid).
``metric: "auto"`` picks a mono-modal metric when the moving image is a pseudo-CT and Mattes
mutual information when it is the raw MR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import load_config, read_mapping, setting, to_dict
from ..errors import ConfigError
from ..resources import resource_path

METRICS = ("auto", "correlation", "mean_squares", "mattes_mi", "ants_cc")


@dataclass
class InitStage:
    enabled: bool = setting(True, help="translate so that mask centroids coincide")
    method: str = setting("auto", choices=("auto", "bone_centroid", "body_centroid", "geometry"),
                          help="auto: bone centroids with a pseudo-CT, body centroids with raw MR")


@dataclass
class LinearStage:
    enabled: bool = setting(True)
    metric: str = setting("auto", choices=METRICS)
    shrink: list[int] = setting([4, 2, 1], lo=1, hi=16, help="shrink factor per resolution level")
    smooth_mm: list[float] = setting([2.0, 1.0, 0.0], lo=0, hi=20, help="Gaussian sigma (mm) per level")
    iterations: int = setting(60, lo=1, hi=5000)
    learning_rate: float = setting(1.0, lo=1e-4, hi=100.0)
    sampling: float = setting(0.2, lo=0.001, hi=1.0, help="fraction of mask voxels sampled per iteration")
    max_samples: int = setting(20000, lo=0, hi=10_000_000, help="cap on samples per iteration and level (0: none)")
    mask_margin_mm: float = setting(15.0, lo=0, hi=200, help="bone mask dilation that bounds the metric region")
    bins: int = setting(32, lo=8, hi=256, help="histogram bins (mutual information only)")


@dataclass
class PerBoneStage(LinearStage):
    bones: list[str] = setting(["femur", "tibia"], help="bones registered separately (names from ctsma.BONES)")
    blend_power: float = setting(2.0, lo=0.5, hi=8.0, help="inverse-distance power of the per-bone blend")
    blend_radius_mm: float = setting(25.0, lo=1, hi=500, help="distance at which the global transform takes over")
    rigid_margin_mm: float = setting(1.5, lo=0, hi=20, help="distance from a bone inside which its motion is exact")
    field_spacing_mm: float = setting(1.0, lo=0.2, hi=10, help="grid spacing of the blended displacement field")


@dataclass
class DeformableStage:
    enabled: bool = setting(False)
    metric: str = setting("auto", choices=METRICS)
    mesh_mm: float = setting(30.0, lo=2, hi=500, help="B-spline control-point spacing (mm)")
    shrink: list[int] = setting([2, 1], lo=1, hi=16)
    smooth_mm: list[float] = setting([1.0, 0.0], lo=0, hi=20)
    iterations: int = setting(30, lo=1, hi=5000)
    sampling: float = setting(0.1, lo=0.001, hi=1.0)
    max_samples: int = setting(20000, lo=0, hi=10_000_000)
    mask_margin_mm: float = setting(15.0, lo=0, hi=200)
    bins: int = setting(32, lo=8, hi=256)
    bone_rigidity: float = setting(1.0, lo=0.0, hi=1.0,
                                   help="1: the deformation inside each bone is replaced by its best rigid fit")


@dataclass
class Preset:
    name: str = setting("custom")
    description: str = setting("")
    use_synthesis: bool = setting(True, help="register the pseudo-CT (true) or the raw MR (false) to the CT")
    threads: int = setting(0, lo=0, hi=256, help="ITK threads (0: all cores)")
    seed: int = setting(7, lo=0, hi=2**31 - 1)
    reject_worse: bool = setting(True, help="drop a stage whose result is worse than its input")
    qa_spacing_mm: float = setting(1.2, lo=0.1, hi=10.0, help="grid of the before/after metrics and bone Dice")
    init: InitStage = field(default_factory=InitStage)
    rigid: LinearStage = field(default_factory=LinearStage)
    affine: LinearStage = field(default_factory=lambda: LinearStage(enabled=False))
    per_bone: PerBoneStage = field(default_factory=PerBoneStage)
    deformable: DeformableStage = field(default_factory=DeformableStage)

    def to_dict(self) -> dict:
        return to_dict(self)


def preset_names() -> list[str]:
    """Names of the presets shipped in ``Resources/Presets/registration``."""
    folder = resource_path("Presets", "registration")
    return sorted(p.stem for p in folder.glob("*.json"))


def load_preset(name_or_path: str | Path | Mapping | None = "default",
                overrides: Mapping[str, Any] | None = None) -> Preset:
    """A shipped preset by name, a preset JSON/YAML file, or a mapping; ``overrides`` are merged on top."""
    if isinstance(name_or_path, Preset):
        base: Any = name_or_path.to_dict()
    elif name_or_path is None or isinstance(name_or_path, Mapping):
        base = dict(name_or_path or {})
    else:
        p = Path(name_or_path)
        if p.suffix.lower() in (".json", ".yaml", ".yml") or p.exists():
            base = read_mapping(p)
        else:
            path = resource_path("Presets", "registration", must_exist=True) / f"{name_or_path}.json"
            if not path.is_file():
                raise ConfigError(f"unknown registration preset {str(name_or_path)!r} "
                                  f"(shipped: {', '.join(preset_names())}; or give a JSON file)")
            base = read_mapping(path)
    return check_preset(load_config(base, Preset, overrides=dict(overrides or {})))


def check_preset(p: Preset) -> Preset:
    """Refuse settings that are each in range but do not fit together: per-level lists of different lengths, and
    bones that :data:`ctsma.BONES` does not name."""
    from .. import BONES

    for name in ("rigid", "affine", "per_bone", "deformable"):
        stage = getattr(p, name)
        if len(stage.shrink) != len(stage.smooth_mm) or not stage.shrink:
            raise ConfigError(f"{name}.shrink ({len(stage.shrink)} levels) and {name}.smooth_mm "
                              f"({len(stage.smooth_mm)} levels) must give one value per resolution level each")
    unknown = [b for b in p.per_bone.bones if b not in BONES]
    if unknown:
        raise ConfigError(f"per_bone.bones: unknown bone(s) {unknown}; use names of {sorted(BONES)}")
    return p


def variant(preset: Preset, **changes: Any) -> Preset:
    """A copy of ``preset`` with stage switches/settings changed, e.g. ``variant(p, per_bone={"enabled": False})``."""
    return load_preset(preset.to_dict(), changes)


__all__ = ["Preset", "InitStage", "LinearStage", "PerBoneStage", "DeformableStage", "load_preset",
           "preset_names", "variant", "METRICS"]
