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
             threads: int = 0, extra: list[str] | None = None) -> list[str]:
    """``ctsma register MR CT --out DIR`` writes the transform, resampled MR/pseudo-CT and qa.json."""
    args = ["register", str(mr), str(ct), "--out", str(out)]
    if preset:
        args += ["--preset", preset]
    if ct_bones is not None:
        args += ["--ct-bones", str(ct_bones)]
    if threads > 0:
        args += ["--threads", str(int(threads))]
    return args + list(extra or [])


def segment_bones(ct: Path, out: Path, side: str = "auto") -> list[str]:
    """``ctsma segment CT --out DIR --no-rois`` writes ``DIR/bones.nii.gz``; ``side`` (L/R) picks the knee in a CT
    of both knees."""
    args = ["segment", str(ct), "--out", str(out), "--no-rois"]
    return args + (["--side", side] if side in ("L", "R") else [])


def create_rois(ct: Path, bones: Path, out: Path, side: str = "auto") -> list[str]:
    """``ctsma segment CT --bones B --out DIR`` writes ``DIR/rois.nii.gz`` from the given bones;
    ``side`` (L/R) is needed when the bones show no fibula."""
    args = ["segment", str(ct), "--out", str(out), "--bones", str(bones)]
    return args + (["--side", side] if side in ("L", "R") else [])


def infer(ct: Path, out: Path, model: str = "", device: str = "auto", bones: Path | None = None,
          rois: Path | None = None, side: str = "auto", match_sharpness: bool = True,
          slice_thickness: float | None = None, subject: str = "") -> list[str]:
    """``ctsma infer CT --out DIR`` writes maps, ROI/bone labels, roi_table.csv and summary.json;
    ``slice_thickness``: the CT's DICOM SliceThickness, which the exported file does not carry; ``subject``: the
    knee's ID in the outputs (the CT volume's name; the exported file's name says nothing)."""
    args = ["infer", str(ct), "--out", str(out), "--device", device]
    if subject.strip():
        args += [f"--subject={subject}"]  # one argument: a volume name may begin with '-'
    if not match_sharpness:
        args += ["--no-harmonise"]
    if slice_thickness:
        args += ["--slice-thickness", f"{slice_thickness:g}"]
    if model:
        args += ["--model", model]
    if bones is not None:
        args += ["--segmentation", str(bones)]
    if rois is not None:
        args += ["--rois", str(rois)]
    if side in ("L", "R"):
        args += ["--side", side]
    return args


def report(ct: Path, infer_dir: Path, out: Path, subject: str = "") -> list[str]:
    """``ctsma report patient CT INFER_DIR --out DIR --format both`` writes ``DIR/report/patient_<subject>.pdf``
    and ``.html``."""
    args = ["report", "patient", str(ct), str(infer_dir), "--out", str(out), "--format", "both"]
    return args + (["--subject", subject] if subject else [])


TRAINING_KINDS = ("student", "teacher", "baseline")


def train(kind: str, config: Path, out: Path, store: Path | None = None) -> list[str]:
    """``ctsma train KIND --config C --out DIR [--store STORE]`` (KIND: student, teacher or baseline)."""
    if kind not in TRAINING_KINDS:
        raise ValueError(f"training kind must be one of {TRAINING_KINDS}")
    args = ["train", kind, "--config", str(config), "--out", str(out)]
    return args + (["--store", str(store)] if store is not None else [])


def dataset_build(manifest: Path, out: Path) -> list[str]:
    """``ctsma dataset build --manifest M --out STORE``: the patch store a training reads."""
    return ["dataset", "build", "--manifest", str(manifest), "--out", str(out)]
