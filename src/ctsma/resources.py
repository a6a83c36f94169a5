"""Locate the extension's shared ``Resources/`` folder (presets, colour tables, demo models).

In a source checkout and an editable install, ``ctsma/resources`` is a link to the
repository's top-level ``Resources/``; the Slicer build and wheels install a copy.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

ROOT = Path(__file__).resolve().parent / "resources"


def resource_path(*parts: str, must_exist: bool = True) -> Path:
    """Path of a file under ``Resources/``; a clear error if it is missing."""
    p = ROOT.joinpath(*parts)
    if must_exist and not p.exists():
        raise UserError(f"resource not found: Resources/{'/'.join(parts)} (is the installation complete?)")
    return p
