"""The registration QA's verdict: one rule for ``ctsma register``, which flags a failed pair, and for
``ctsma dataset build``, which leaves it out (with its own, configurable threshold)."""

from __future__ import annotations

import numpy as np

EXIT_QA_FAILED = 3
"""Exit code of ``ctsma register MR CT`` for a pair registered and written that failed the QA: not 0 (scripts must
notice), and not 1 or 2 (errors, nothing written), so that the Slicer module still loads the outputs to look at."""

MIN_BONE_DICE = 0.6
"""Least femur and tibia Dice of a registration that passes. A pair whose bones miss each other this much (an MR
with a flipped header, another knee, the wrong side) is unusable; correct pairs reach 0.9 and more on the phantom."""


def registration_qa_problem(qa: dict, min_bone_dice: float) -> str | None:
    """Why a ``qa.json`` counts as failed, or None if it passed.

    Failed: an explicit ``passed``/``ok`` false or ``status`` "failed", or a femur/tibia bone Dice (top-level
    ``bone_dice`` or the last kept stage's) below ``min_bone_dice``.
    """
    for key in ("passed", "ok", "qa_passed"):
        if key in qa and qa[key] is False:
            return f"registration QA says {key}=false"
    if str(qa.get("status", "")).lower() in ("failed", "fail", "error"):
        return f"registration QA status {qa['status']!r}"
    dice = dict(qa.get("bone_dice") or {})
    if not dice:
        kept = [s for s in qa.get("stages", []) if s.get("kept", True) and s.get("bone_dice")]
        if kept:
            dice = kept[-1]["bone_dice"]
    for bone in ("femur", "tibia"):
        v = dice.get(bone)
        if v is not None and np.isfinite(float(v)) and float(v) < min_bone_dice:
            return f"registration QA failed: {bone} Dice {float(v):.2f} < {min_bone_dice:g}"
    return None
