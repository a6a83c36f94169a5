"""Digital knee phantom: analytic anatomy, procedural trabecular microstructure, OA grades,
BFFE MR and clinical CT simulation in separate scanner frames, with exact ground truth.

Public API: :func:`generate_knee`, :func:`generate_cohort`, :func:`truth_binary`,
:func:`load_manifest`, :func:`make_settings`. See docs/phantom.md.
"""

from .settings import GENERATOR_VERSION, PRESETS, PhantomSettings, make_settings
from .cohort import generate_cohort, generate_knee, load_manifest, subject_id
from .truth import knee_model, truth_binary

__all__ = ["GENERATOR_VERSION", "PRESETS", "PhantomSettings", "make_settings", "generate_cohort", "generate_knee",
           "load_manifest", "subject_id", "knee_model", "truth_binary"]
