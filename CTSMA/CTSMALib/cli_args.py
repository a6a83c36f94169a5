"""The ``ctsma`` command lines the Slicer modules run, built in one place.

Each function returns the argument list after ``ctsma`` (``--progress-jsonl`` is added by the
runner). The subcommand names and output files follow ``shared/notes/contracts.md``; options
beyond the contract (``--preset``, ``--bones``, ``--model``, ...) are what the modules ask of
the command line. ``Testing/test_module_ui.py`` parses every list with the real ``ctsma``
parser as soon as the subcommand is registered there, so the two cannot drift apart unseen.
"""

from __future__ import annotations

from pathlib import Path


def register(mr: Path, ct: Path, out: Path, preset: str = "", ct_bones: Path | None = None,
             extra: list[str] | None = None) -> list[str]:
    args = ["register", str(mr), str(ct), "--out", str(out)]
    if preset:
        args += ["--preset", preset]
    if ct_bones is not None:
        args += ["--ct-bones", str(ct_bones)]
    return args + list(extra or [])


def segment_bones(ct: Path, out: Path) -> list[str]:
    """``ctsma segment CT --out DIR --no-rois`` writes ``DIR/bones.nii.gz``."""
    return ["segment", str(ct), "--out", str(out), "--no-rois"]


def create_rois(ct: Path, bones: Path, out: Path) -> list[str]:
    """``ctsma segment CT --bones B --out DIR`` writes ``DIR/rois.nii.gz`` from the given bones."""
    return ["segment", str(ct), "--out", str(out), "--bones", str(bones)]


def infer(ct: Path, out: Path, model: str = "", device: str = "auto", bones: Path | None = None,
          rois: Path | None = None) -> list[str]:
    args = ["infer", str(ct), "--out", str(out), "--device", device]
    if model:
        args += ["--model", model]
    if bones is not None:
        args += ["--bones", str(bones)]
    if rois is not None:
        args += ["--rois", str(rois)]
    return args


def report(result_dir: Path, out: Path) -> list[str]:
    return ["report", str(result_dir), "--out", str(out)]


def train(config: Path, out: Path, device: str = "auto") -> list[str]:
    return ["train", "--config", str(config), "--out", str(out), "--device", device]
