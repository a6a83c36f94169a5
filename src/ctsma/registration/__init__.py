"""Multi-stage MR→CT registration through a pseudo-CT (SimpleITK/ITK engine).

``register(mr, ct, preset=..., ct_bones=..., synthesis=model) -> RegistrationResult`` with one
CT→MR transform and a QA record per stage; ``write_outputs(result, mr, ct, out_dir)`` writes the
contract files; ``cohort.run_cohort(manifest, out, ...)`` registers a cohort. See docs/registration.md.
"""

from .pipeline import RegistrationResult, StageRecord, register, write_outputs
from .presets import Preset, load_preset, preset_names, variant

__all__ = ["register", "write_outputs", "RegistrationResult", "StageRecord", "Preset", "load_preset",
           "preset_names", "variant"]
