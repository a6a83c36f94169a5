"""Bad input at every entry point: a matrix of (entry point × case) driven through ``ctsma.cli.main.main``.

Each cell is either an expected clear error (exit code 2, one line ``ctsma <cmd>: error: ...`` naming the
problem, no traceback, no file left in the output folder), a per-row failure of a batch command (exit 1,
the row reported, the other rows unaffected), or explicitly not applicable with the reason. Every bad input
must be refused before any real work (segmentation, registration, training) starts, which is what keeps this
suite fast. The same table is written out in docs/reliability.md.

Also here: subprocess runs proving no traceback reaches a terminal, the Slicer module logics fed the same bad
volumes, "no pickled code ever runs", paths that cannot escape the output folder, argument lists (never shell
strings) for subprocesses, and hypothesis fuzzing of the image reader and the config loader.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from ctsma import PARAMETER_FILE_NAMES
from ctsma.cli.main import main as cli_main
from ctsma.errors import ConfigError, InputImageError, ModelFileError, UserError

REPO = Path(__file__).resolve().parent.parent

IMAGE_CASES = ("missing", "truncated", "corrupt", "image_2d", "image_4d", "nonfinite", "zero_spacing",
               "negative_spacing", "sheared")
OTHER_CASES = ("mr_as_ct", "seg_mismatch", "empty_roi", "huge", "model_tampered", "model_pickle",
               "model_wrong_kind", "config_unknown", "config_range", "out_not_writable")
CASES = IMAGE_CASES + ("huge",) + tuple(c for c in OTHER_CASES if c != "huge")

IMAGE_MESSAGES = {
    "missing": r"not found",
    "truncated": r"truncated",
    "corrupt": r"corrupted or not an image",
    "image_2d": r"is 2D .*a 3D volume is required",
    "image_4d": r"is 4D .*a 3D image is required",
    "nonfinite": r"non-finite voxels",
    "zero_spacing": r"invalid voxel spacing",
    "negative_spacing": r"invalid voxel spacing",
    "sheared": r"non-orthogonal direction",
    "huge": r"over the memory budget of .*\(set CTSMA_(MAX_VOXELS|MEMORY_GB) to",
}
MISMATCH = r"does not match the geometry|does not overlap the CT"
MODEL_MESSAGES = {
    "model_tampered": r"failed its checksum",
    "model_pickle": r"not a CT-SMA model file",
    "model_wrong_kind": r"is a 'diagnosis' model; a '\w+' model is needed",
}


# -- inputs, built once ------------------------------------------------------------------------------------------
def _img(arr, spacing=(0.5, 0.5, 0.5), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing[: im.GetDimension()])
    im.SetOrigin(origin[: im.GetDimension()])
    return im


def _patch_nifti(src: Path, dst: Path, edits: dict[int, bytes]) -> Path:
    raw = bytearray(src.read_bytes())
    for off, val in edits.items():
        raw[off:off + len(val)] = val
    dst.write_bytes(bytes(raw))
    return dst


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    ct = np.full((20, 22, 24), -1000.0, np.float32)
    ct[4:16, 5:17, 6:18] = 40.0
    ct[8:12, 8:14, 8:16] = 900.0
    ct += rng.normal(0, 5, ct.shape).astype(np.float32)
    mr = np.clip(ct + 1000.0, 0, None) * 0.4  # magnitudes, never negative
    p: dict = {"dir": d}
    sitk.WriteImage(_img(ct), str(d / "ct.nii.gz"))
    sitk.WriteImage(_img(mr), str(d / "mr.nii.gz"))
    p["ct"], p["mr"] = d / "ct.nii.gz", d / "mr.nii.gz"
    bones = (ct > 300).astype(np.uint8)
    bones[:10] *= 2  # tibia (2) below, femur (1) above
    sitk.WriteImage(_img(bones), str(d / "bones.nii.gz"))
    p["bones"] = d / "bones.nii.gz"
    sitk.WriteImage(_img(bones, origin=(500.0, 0.0, 0.0)), str(d / "bones_small.nii.gz"))  # no overlap
    p["seg_mismatch"] = d / "bones_small.nii.gz"
    sitk.WriteImage(_img(np.zeros_like(bones)), str(d / "empty.nii.gz"))
    p["empty_roi"] = d / "empty.nii.gz"
    rois = np.zeros_like(bones)
    rois[10:12, 8:14, 8:12], rois[10:12, 8:14, 12:16] = 1, 2
    rois[7:9, 8:14, 8:12], rois[7:9, 8:14, 12:16] = 3, 4
    sitk.WriteImage(_img(rois), str(d / "rois.nii.gz"))
    p["rois"] = d / "rois.nii.gz"
    sitk.WriteTransform(sitk.Transform(3, sitk.sitkIdentity), str(d / "identity.tfm"))
    p["identity"] = d / "identity.tfm"
    # bad images
    p["missing"] = d / "no_such_ct.nii.gz"
    sitk.WriteImage(_img(ct), str(d / "plain.nii"))
    raw = (d / "plain.nii").read_bytes()
    (d / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    p["truncated"] = d / "truncated.nii"
    (d / "corrupt.nrrd").write_bytes(b"NRRD0004\ntype: flo\x00at\ndimens" + bytes(range(256)))
    p["corrupt"] = d / "corrupt.nrrd"
    sitk.WriteImage(_img(ct[10]), str(d / "slice2d.nii.gz"))
    p["image_2d"] = d / "slice2d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([_img(ct), _img(ct)]), str(d / "series4d.nrrd"))
    p["image_4d"] = d / "series4d.nrrd"
    nan = ct.copy()
    nan[3, 3, 3] = np.nan
    sitk.WriteImage(_img(nan), str(d / "nan.nrrd"))
    p["nonfinite"] = d / "nan.nrrd"
    p["zero_spacing"] = _patch_nifti(d / "plain.nii", d / "zero_spacing.nii", {80: struct.pack("<f", 0.0)})
    p["negative_spacing"] = _patch_nifti(d / "plain.nii", d / "negative_spacing.nii", {84: struct.pack("<f", -0.5)})
    p["sheared"] = _patch_nifti(d / "plain.nii", d / "sheared.nii", {296: struct.pack("<f", 0.25)})  # srow_y[0]
    hdr = ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 3000 3000 3000\n"
           "space directions: (0.1,0,0) (0,0.1,0) (0,0,0.1)\nkinds: domain domain domain\nendian: little\n"
           "encoding: raw\nspace origin: (0,0,0)\n\n")
    (d / "huge.nrrd").write_text(hdr)  # 27e9 voxels declared, no payload: must be refused from the header
    p["huge"] = d / "huge.nrrd"
    # model files
    from ctsma.modelfile import save_model
    import torch

    good = save_model(d / "diag.safetensors", {"w": torch.arange(6.0)}, {"note": "test"}, kind="diagnosis")
    p["model_wrong_kind"] = good
    p["model_tampered"] = _tamper(good, d / "tampered.safetensors")
    p["marker"] = d / "PICKLE_RAN"
    with open(d / "pickled.safetensors", "wb") as fh:
        pickle.dump(_Evil(str(p["marker"])), fh)
    p["model_pickle"] = d / "pickled.safetensors"
    # configs and not-writable outputs
    (d / "unknown.yaml").write_text(yaml.safe_dump({"no_such_setting": 1}))
    p["config_unknown"] = d / "unknown.yaml"
    (d / "a_file").write_text("not a folder")
    p["not_writable"] = d / "a_file" / "out"  # a folder below a regular file: cannot be created, even by root
    # tables
    (d / "labels.csv").write_text("subject,oa,severity\nk1,0,0\nk2,1,2\n")
    p["labels"] = d / "labels.csv"
    (d / "metrics.json").write_text(json.dumps({"regression": {}}))  # a block, no values
    return p


class _Evil:
    """Unpickling this runs code (creates a marker file); a safe loader must never unpickle it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def _tamper(src: Path, dst: Path) -> Path:
    """A copy whose last stored weight is changed (to +inf): only the checksum can notice."""
    raw = bytearray(Path(src).read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"
    dst.write_bytes(bytes(raw))
    return dst


def _config(inp, name: str, data: dict, suffix=".yaml") -> Path:
    path = inp["dir"] / f"{name}{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


def _manifest(inp, name: str, rows: list[dict]) -> Path:
    import pandas as pd

    path = inp["dir"] / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# -- the matrix --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    argv: list | None = None      # the ctsma arguments
    expect: str = "error"          # error (exit 2, one line) | row-failed (exit 1, row reported) | na
    match: str = ""                # regex the message must contain
    reason: str = ""               # why not applicable


def NA(reason: str) -> Cell:
    return Cell(expect="na", reason=reason)


NO_IMAGE = "takes no image"
NO_MODEL = "reads no model file"
NO_CONFIG = "takes no config file (options are checked by argparse)"


def _image_cell(case, inp, argv_for) -> Cell | None:
    if case in IMAGE_MESSAGES:
        return Cell(argv_for(inp[case]), match=IMAGE_MESSAGES[case])
    return None


def _segment(case, inp, out):
    cell = _image_cell(case, inp, lambda img: ["segment", img, "--out", out])
    if cell:
        return cell
    return {
        "mr_as_ct": Cell(["segment", inp["mr"], "--out", out], match="not plausible Hounsfield units"),
        "seg_mismatch": Cell(["segment", inp["ct"], "--bones", inp["seg_mismatch"], "--out", out],
                             match=MISMATCH),
        "empty_roi": Cell(["segment", inp["ct"], "--bones", inp["empty_roi"], "--out", out],
                          match="has no femur .label 1. and no tibia .label 2."),
        "out_not_writable": Cell(["segment", inp["ct"], "--out", inp["not_writable"]], match="output folder"),
    }.get(case) or NA(NO_MODEL if case.startswith("model") else NO_CONFIG)


def _morphometry(case, inp, out):
    cell = _image_cell(case, inp, lambda img: ["morphometry", img, "--out", out, "--modality", "ct"])
    if cell:
        return cell
    return {
        "mr_as_ct": Cell(["morphometry", inp["mr"], "--modality", "ct", "--out", out], expect="warning",
                         match="not plausible Hounsfield units"),
        "seg_mismatch": Cell(["morphometry", inp["ct"], "--modality", "ct", "--mask", inp["seg_mismatch"],
                              "--out", out], match=MISMATCH),
        "empty_roi": Cell(["morphometry", inp["ct"], "--modality", "ct", "--mask", inp["empty_roi"], "--out", out],
                          match="empty"),
        "out_not_writable": Cell(["morphometry", inp["ct"], "--modality", "ct", "--out", inp["not_writable"]],
                                 match="output folder"),
    }.get(case) or NA(NO_MODEL if case.startswith("model") else NO_CONFIG)


def _infer(case, inp, out):
    base = ["infer", "--model", inp["student"]]
    cell = _image_cell(case, inp, lambda img: [*base, img, "--out", out])
    if cell:
        return cell
    if case in MODEL_MESSAGES:
        return Cell(["infer", inp["ct"], "--model", inp[case + "/student"], "--out", out],
                    match=MODEL_MESSAGES[case].replace(r"\w+", "student"))
    return {
        "mr_as_ct": Cell([*base, inp["mr"], "--out", out], match="not plausible Hounsfield units"),
        "seg_mismatch": Cell([*base, inp["ct"], "--segmentation", inp["seg_mismatch"], "--out", out],
                             match=MISMATCH),
        "empty_roi": Cell([*base, inp["ct"], "--segmentation", inp["bones"], "--rois", inp["empty_roi"],
                           "--out", out], match="ROIs are empty"),
        "config_range": Cell([*base, inp["ct"], "--stride", "-1", "--out", out], match="--stride must be"),
        "out_not_writable": Cell([*base, inp["ct"], "--out", inp["not_writable"]], match="output folder"),
    }.get(case) or NA(NO_CONFIG)


def _register(slot):
    def build(case, inp, out):
        def argv(mr, ct, *extra):
            return ["register", mr, ct, "--preset", "nosynth", "--out", out, *extra]

        cell = _image_cell(case, inp, lambda img: argv(img, inp["ct"]) if slot == "mr" else argv(inp["mr"], img))
        if cell:
            return cell
        if slot == "mr":  # the remaining cases do not depend on which image slot is tested
            return NA("covered by the register (CT slot) row")
        if case in MODEL_MESSAGES:
            return Cell(["register", inp["mr"], inp["ct"], "--preset", "default", "--model", inp[case + "/synthesis"],
                         "--out", out], match=MODEL_MESSAGES[case].replace(r"\w+", "synthesis"))
        return {
            "mr_as_ct": Cell(argv(inp["mr"], inp["mr"]), match="not plausible Hounsfield units"),
            "seg_mismatch": Cell(argv(inp["mr"], inp["ct"], "--ct-bones", inp["seg_mismatch"]),
                                 match=MISMATCH),
            "empty_roi": Cell(argv(inp["mr"], inp["ct"], "--ct-bones", inp["empty_roi"]),
                              match="no voxels for femur, tibia"),
            "config_unknown": Cell(["register", inp["mr"], inp["ct"], "--preset",
                                    _config(inp, "preset_unknown", {"no_such_setting": 1}, ".json"), "--out", out],
                                   match="no_such_setting"),
            "config_range": Cell(["register", inp["mr"], inp["ct"], "--preset",
                                  _config(inp, "preset_range", {"use_synthesis": False, "qa_spacing_mm": -1},
                                          ".json"), "--out", out], match="qa_spacing_mm"),
            "out_not_writable": Cell(argv(inp["mr"], inp["ct"])[:-2] + ["--out", inp["not_writable"]],
                                     match="output folder"),
        }.get(case)
    return build


def _register_cohort(case, inp, out):
    if case in IMAGE_MESSAGES:
        m = _manifest(inp, f"reg_{case}", [{"subject": "bad", "mr": inp[case], "ct": inp["ct"]}])
        if case == "missing":  # the manifest itself missing is the user error; a missing row image fails the row
            return Cell(["register", "--manifest", inp["missing"].with_suffix(".csv"), "--preset", "nosynth",
                         "--out", out], match="manifest not found")
        return Cell(["register", "--manifest", m, "--preset", "nosynth", "--out", out], expect="row-failed",
                    match=IMAGE_MESSAGES[case])
    return NA("same per-pair checks as register (CT slot); a bad row is reported and the others go on")


def _synthesis_apply(case, inp, out):
    cell = _image_cell(case, inp, lambda img: ["synthesis", "apply", img, "--model", inp["synthesis"],
                                               "--out", out / "pct.nii.gz"])
    if cell:
        return cell
    if case in MODEL_MESSAGES:
        return Cell(["synthesis", "apply", inp["mr"], "--model", inp[case + "/synthesis"], "--out",
                     out / "pct.nii.gz"],
                    match=MODEL_MESSAGES[case].replace(r"\w+", "synthesis"))
    if case == "out_not_writable":
        return Cell(["synthesis", "apply", inp["mr"], "--model", inp["synthesis"], "--out",
                     inp["not_writable"] / "pct.nii.gz"], match="output folder|cannot (create|write)")
    if case == "mr_as_ct":
        return NA("takes an MR; any non-negative intensity range is a valid MR")
    return NA("takes one MR image and a model only" if case in ("seg_mismatch", "empty_roi") else NO_CONFIG)


def _synthesis_train(case, inp, out):
    def argv(manifest, *extra):
        return ["synthesis", "train", "--manifest", manifest, "--out", out / "synth.safetensors",
                "--preset", "demo", *extra]

    if case in IMAGE_MESSAGES:
        m = _manifest(inp, f"syn_{case}", [{"subject": "a", "mr": inp[case], "ct": inp["ct"]}])
        return Cell(argv(m), match=IMAGE_MESSAGES[case])
    good = _manifest(inp, "syn_good", [{"subject": "a", "mr": inp["mr"], "ct": inp["ct"]}])
    return {
        "mr_as_ct": Cell(argv(_manifest(inp, "syn_mrct", [{"subject": "a", "mr": inp["mr"], "ct": inp["mr"]}])),
                         match="not plausible Hounsfield units"),
        "seg_mismatch": Cell(argv(_manifest(inp, "syn_seg", [{"subject": "a", "mr": inp["mr"], "ct": inp["ct"],
                                                               "ct_bones": inp["seg_mismatch"]}])),
                             match=MISMATCH),
        "config_unknown": Cell(["synthesis", "train", "--manifest", good, "--out", out / "s.safetensors",
                                "--preset", inp["config_unknown"]], match="no_such_setting"),
        "config_range": Cell(["synthesis", "train", "--manifest", good, "--out", out / "s.safetensors", "--preset",
                              _config(inp, "syn_range", {"working_spacing_mm": 0})], match="working_spacing_mm"),
        "out_not_writable": Cell(["synthesis", "train", "--manifest", good, "--preset", "demo", "--out",
                                  inp["not_writable"] / "s.safetensors"], match="output folder|cannot (create|write)"),
        "empty_roi": Cell(argv(_manifest(inp, "syn_empty", [{"subject": "a", "mr": inp["mr"], "ct": inp["ct"],
                                                              "ct_bones": inp["empty_roi"]}])),
                          match="no voxels for femur, tibia"),
    }.get(case) or NA("trains a model; reads none")


def _dataset(case, inp, out):
    def argv(manifest, *extra):
        return ["dataset", "build", "--manifest", manifest, "--out", out, *extra]

    if case == "missing":
        return Cell(argv(inp["missing"].with_suffix(".csv")), match="not found")
    row = {"subject": "a", "side": "R", "ct": inp["ct"], "mr": inp["mr"], "transform_ct_to_mr": inp["identity"],
           "ct_rois": inp["rois"]}
    bad = {"mr_as_ct": {"ct": inp["mr"]}, "seg_mismatch": {"ct_rois": inp["seg_mismatch"]},
           "empty_roi": {"ct_rois": inp["empty_roi"]}}
    if case in IMAGE_MESSAGES or case in bad:
        m = _manifest(inp, f"ds_{case}", [{**row, **bad.get(case, {"ct": inp.get(case)})}])
        match = IMAGE_MESSAGES.get(case) or {"mr_as_ct": "Hounsfield", "seg_mismatch": MISMATCH,
                                             "empty_roi": "empty|no voxels|no patch"}[case]
        if case == "huge":  # the memory budget stops the whole build, not just the subject
            return Cell(argv(m, "--transform-column", "transform_ct_to_mr"), match=match)
        return Cell(argv(m, "--transform-column", "transform_ct_to_mr"),
                    match=r"no subject could be used; reasons: a: .*(" + match + ")")
    good = _manifest(inp, "ds_good", [{"subject": "a", "side": "R", "ct": inp["ct"], "mr": inp["mr"]}])
    if case == "config_unknown":
        return Cell(argv(good, "--config", inp["config_unknown"]), match="no_such_setting")
    if case == "config_range":
        return Cell(argv(good, "--config", _config(inp, "ds_range", {"stride_mm": 0.0})), match="stride_mm")
    if case == "out_not_writable":
        return Cell(["dataset", "build", "--manifest", good, "--out", inp["not_writable"]],
                    match="output folder|cannot create")
    return NA(NO_MODEL)


def _phantom(case, inp, out):
    if case == "config_unknown":
        return Cell(["phantom", "--n", "1", "--out", out, "--config", inp["config_unknown"]], match="no_such_setting")
    if case == "config_range":
        return Cell(["phantom", "--n", "1", "--out", out, "--config",
                     _config(inp, "ph_range", {"mr_spacing": [0.0, 0.3, 0.3]})], match="mr_spacing")
    if case == "missing":
        return Cell(["phantom", "--n", "1", "--out", out, "--config", inp["missing"].with_suffix(".yaml")],
                    match="not found")
    if case == "out_not_writable":
        return Cell(["phantom", "--n", "1", "--out", inp["not_writable"]], match="output folder|cannot create")
    return NA(NO_IMAGE + " and no model; it generates them")


def _train(case, inp, out):
    if case == "missing":
        return Cell(["train", "student", "--config", inp["missing"].with_suffix(".yaml"), "--out", out],
                    match="not found")
    if case == "config_unknown":
        return Cell(["train", "student", "--config", inp["config_unknown"], "--out", out], match="no_such_setting")
    if case == "config_range":
        return Cell(["train", "student", "--config", _config(inp, "tr_range", {"data": {"batch_size": 0}}),
                     "--out", out], match="batch_size")
    if case == "out_not_writable":
        return Cell(["train", "student", "--config", REPO / "Resources/Configs/demo.yaml", "--store", inp["dir"],
                     "--out", inp["not_writable"]], match="output folder|cannot create|not a patch store|store")
    return NA("reads a patch store, no image or model file")


def _evaluate(case, inp, out):
    if case == "config_unknown":
        return Cell(["evaluate", "--config", inp["config_unknown"], "--out", out], match="no_such_setting")
    if case == "config_range":
        return Cell(["evaluate", "--config", _config(inp, "ev_range", {"data": {"batch_size": 0}}), "--out", out],
                    match="batch_size")
    if case == "missing":
        return Cell(["evaluate", "--config", inp["missing"].with_suffix(".yaml"), "--out", out], match="not found")
    if case == "out_not_writable":
        return Cell(["evaluate", "--config", REPO / "Resources/Configs/demo.yaml", "--out", inp["not_writable"]],
                    match="output folder|cannot create")
    return NA("reads a patch store and the run's model files by config")


def _demo(case, inp, out):
    if case == "config_unknown":
        return Cell(["demo", "--out", out, "--config", inp["config_unknown"]], match="no_such_setting")
    if case == "config_range":
        return Cell(["demo", "--out", out, "--n", "2"], match=r"\bn\b")
    if case == "out_not_writable":
        return Cell(["demo", "--out", inp["not_writable"]], match="output folder|cannot create")
    if case == "missing":
        return Cell(["demo", "--out", out, "--config", inp["missing"].with_suffix(".yaml")], match="not found")
    return NA(NO_IMAGE + "; it generates its own phantom")


def _diagnose_predict(case, inp, out):
    if case in MODEL_MESSAGES:
        if case == "model_wrong_kind":
            return Cell(["diagnose", "predict", "--model", inp["student"], "--patches", inp["labels"]],
                        match=r"is a '\w+' model; a 'diagnosis' model is needed")
        return Cell(["diagnose", "predict", "--model", inp[case], "--patches", inp["labels"]],
                    match=MODEL_MESSAGES[case])
    if case == "missing":
        return Cell(["diagnose", "predict", "--model", inp["missing"].with_suffix(".safetensors"), "--patches",
                     inp["patches"]], match="model file not found")
    return NA("reads CSV tables and a model, no image or config")


def _diagnose_train(case, inp, out):
    if case == "missing":
        return Cell(["diagnose", "train", "--patches", inp["missing"].with_suffix(".csv"), "--labels", inp["labels"],
                     "--out", out / "m.safetensors"], match="not found|does not exist|no such")
    if case == "config_range":
        return Cell(["diagnose", "train", "--patches", inp["patches"], "--labels", inp["labels"], "--folds", "1",
                     "--out", out / "m.safetensors"], match="--folds must be at least 2")
    if case == "out_not_writable":
        return Cell(["diagnose", "train", "--patches", inp["patches"], "--labels", inp["labels"], "--out",
                     inp["not_writable"] / "m.safetensors"], match="output folder|cannot (create|write)")
    return NA("reads CSV tables only")


def _report_patient(case, inp, out):
    cell = _image_cell(case, inp, lambda img: ["report", "patient", img, inp["infer_dir"], "--out", out])
    if cell:
        return cell
    return {
        "mr_as_ct": NA("the CT is only displayed; its analysis (infer) already refused an MR"),
        "empty_roi": Cell(["report", "patient", inp["ct"], inp["infer_empty"], "--out", out], match="empty"),
        "seg_mismatch": Cell(["report", "patient", inp["ct"], inp["infer_mismatch"], "--out", out],
                             match=MISMATCH),
        "out_not_writable": Cell(["report", "patient", inp["ct"], inp["infer_dir"], "--out", inp["not_writable"]],
                                 match="output folder|cannot create"),
    }.get(case) or NA("renders files written by infer; no model or config")


def _report_study(case, inp, out):
    if case == "missing":
        return Cell(["report", "study", out, "--metrics", inp["missing"].with_suffix(".json")],
                    match="does not exist")
    if case == "out_not_writable":
        return Cell(["report", "study", inp["not_writable"], "--metrics", inp["dir"] / "metrics.json"],
                    match="output folder|cannot create")
    return NA("renders metrics.json and CSV tables")


ENTRY_POINTS = {
    "segment": _segment, "morphometry": _morphometry, "infer": _infer, "register (MR slot)": _register("mr"),
    "register (CT slot)": _register("ct"), "register --manifest": _register_cohort,
    "synthesis apply": _synthesis_apply, "synthesis train": _synthesis_train, "dataset build": _dataset,
    "phantom": _phantom, "train": _train, "evaluate": _evaluate, "demo": _demo,
    "diagnose train": _diagnose_train, "diagnose predict": _diagnose_predict, "report patient": _report_patient,
    "report study": _report_study,
}


@pytest.fixture(scope="module")
def models(inp):
    """A tiny student and synthesis model (valid files) for the cells that need one to get past loading."""
    import torch

    from ctsma.models.export import build_meta, export_model
    from ctsma.models.networks import PatchRegressor
    from ctsma.synthesis import SynthesisModel
    from ctsma.synthesis.model import DEFAULT_NORMALISATION
    from ctsma.synthesis.network import build_network

    torch.manual_seed(0)
    net = PatchRegressor(2, 16, widths=(4, 8, 8, 8), head_hidden=8)
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8.0, masks=True,
                      intensity_offset=0.0, intensity_scale=1000.0, target="mr", y_mean=np.zeros(4),
                      y_sd=np.ones(4), training={}, metrics={})
    inp["student"] = export_model(inp["dir"] / "student.safetensors", net, meta)
    arch = {"type": "unet25d", "in_slices": 3, "base": 4, "depth": 2}
    syn = SynthesisModel(build_network(arch), {"architecture": arch, "normalisation": DEFAULT_NORMALISATION,
                                               "working_spacing_mm": 1.5, "planes": ["axial"]})
    inp["synthesis"] = inp["dir"] / "synthesis.safetensors"
    syn.save(inp["synthesis"])
    for kind in ("student", "synthesis"):
        inp[f"model_tampered/{kind}"] = _tamper(inp[kind], inp["dir"] / f"tampered_{kind}.safetensors")
    for kind in ("student", "synthesis"):
        inp[f"model_pickle/{kind}"] = inp["model_pickle"]
        inp[f"model_wrong_kind/{kind}"] = inp["model_wrong_kind"]
    rows = [{"subject": s, "roi": r, "rel_x": 0.0, "rel_y": 0.0, "rel_z": 0.0, "BV/TV": 0.3, "Tb.Th": 0.2,
             "Tb.Sp": 0.7, "Tb.N": 1.2} for s in ("k1", "k2") for r in ("MFC", "LFC", "MTP", "LTP")]
    inp["patches"] = _manifest(inp, "patches", rows)
    # infer output folders for 'report patient'
    for name, rois in (("infer_dir", inp["bones"]), ("infer_mismatch", inp["seg_mismatch"]),
                       ("infer_empty", inp["empty_roi"])):
        d = inp["dir"] / name
        d.mkdir()
        (d / "rois.nii.gz").write_bytes(Path(rois).read_bytes())
        (d / "roi_table.csv").write_text("roi,parameter,mean,sd,median,iqr,n_patches\nMFC,BV/TV,0.3,0.1,0.3,0.1,4\n")
        (d / "summary.json").write_text("{}")
        (d / "maps").mkdir()
        for f in PARAMETER_FILE_NAMES.values():  # a complete folder: the report refuses one missing a file
            (d / "maps" / f"{f}.nii.gz").write_bytes(Path(rois).read_bytes())
        inp[name] = d
    return inp


def _cells():
    for ep in ENTRY_POINTS:
        for case in CASES:
            yield pytest.param(ep, case, id=f"{ep.replace(' ', '_')}-{case}")


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@pytest.mark.parametrize("entry,case", list(_cells()))
def test_bad_input_matrix(entry, case, models, tmp_path, capsys, monkeypatch, recwarn):
    inp = models
    out = tmp_path / "out"
    cell = ENTRY_POINTS[entry](case, inp, out)
    assert cell is not None, f"{entry} × {case}: no cell defined"
    if cell.expect == "na":
        assert cell.reason
        pytest.skip(f"not applicable: {cell.reason}")
    monkeypatch.setenv("CTSMA_MAX_VOXELS", str(50_000_000))
    capsys.readouterr()
    rc = cli_main(["--quiet", *map(str, cell.argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not p_marker_exists(inp), "unpickling ran code"
    cmd = cell.argv[0]
    if cell.expect == "error":
        lines = [ln for ln in err.splitlines() if ln.startswith(f"ctsma {cmd}: error: ")]
        assert rc == 2 and len(lines) == 1, f"rc={rc}, stderr={err!r}"
        assert re.search(cell.match, lines[0]), lines[0]
        assert not out.exists(), f"left behind: {out} ({_files_under(out)})"
    elif cell.expect == "warning":  # documented warning: the run goes on
        assert rc == 0, err
        assert any(re.search(cell.match, str(w.message)) for w in recwarn), [str(w.message) for w in recwarn]
    else:  # row-failed: the batch goes on, the bad row is named with its reason
        assert rc == 1, err
        text = "".join(p.read_text() for p in _files_under(out) if p.suffix in (".csv", ".json")) + err
        assert re.search(cell.match, text), text[:500]


def p_marker_exists(inp) -> bool:
    return Path(inp["marker"]).exists()


# -- memory guard --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["morphometry", "{ct}", "--modality", "ct", "--out", "{out}"],
                                  ["infer", "{ct}", "--model", "{student}", "--segmentation", "{bones}", "--rois",
                                   "{rois}", "--side", "L", "--out", "{out}"]],
                         ids=["morphometry", "infer"])
def test_memory_guard_chunks_over_the_budget_and_refuses_below_one_slab(argv, models, tmp_path, capsys,
                                                                          monkeypatch):
    """Over the whole-volume estimate the stage runs in z-slabs (same outputs); under even the smallest slab it
    is refused up front, naming the budget. Testing/test_morphometry_slabs.py and test_inference.py check the
    slab results in depth."""
    from ctsma.io.memory import BYTES_PER_VOXEL, estimate_bytes, header_size, plan_memory

    n = int(np.prod(header_size(models["ct"])))
    assert n == 20 * 22 * 24
    stage = argv[0]
    need = estimate_bytes(n, stage)
    assert need == n * BYTES_PER_VOXEL[stage]

    def run(out):
        names = {"ct": models["ct"], "out": out, "student": models["student"], "bones": models["bones"],
                 "rois": models["rois"]}
        return cli_main(["--quiet", *[a.format(**names) for a in argv]])

    monkeypatch.setenv("CTSMA_MEMORY_GB", str(need * 2 / 1e9))
    plan = plan_memory(n, stage)
    assert plan.need == need and not plan.chunked
    capsys.readouterr()
    rc_whole, err_whole = run(tmp_path / "whole"), capsys.readouterr().err
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(need * 0.85 / 1e9))  # under the estimate: z-slabs, not a refusal
    rc_slabs, err_slabs = run(tmp_path / "slabs"), capsys.readouterr().err
    if stage == "morphometry":
        assert rc_whole == rc_slabs == 0, err_slabs
        whole = json.loads((tmp_path / "whole" / "morphometry.json").read_text())
        part = json.loads((tmp_path / "slabs" / "morphometry.json").read_text())
        assert "slabs" in part and all(part[k] == whole[k] for k in ("BV/TV", "Tb.Th", "Tb.Sp", "Conn.D"))
    else:  # this tiny CT's ROIs are thinner than a patch: past the guard, both runs stop at the same point
        # (Testing/test_inference.py runs inference in z-slabs end to end)
        assert rc_whole == rc_slabs == 2 and err_slabs == err_whole and "no patch fits" in err_slabs
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(need / 50 / 1e9))  # not even one slab
    out = tmp_path / "out"
    rc = run(out)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"ctsma {stage}: error: {stage} of .* needs about [\d.]+ GB, over the memory budget of "
                     r"[\d.]+ GB \(set CTSMA_MEMORY_GB", err), err
    assert not out.exists()  # refused before the output folder was even created
    for bad in ("lots", "-1"):
        monkeypatch.setenv("CTSMA_MEMORY_GB", bad)
        with pytest.raises(UserError, match="CTSMA_MEMORY_GB must be"):
            plan_memory(n, stage)


# -- no traceback reaches a terminal ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nonfinite", "sheared", "huge"])
def test_subprocess_prints_one_line_and_no_traceback(case, inp, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "ctsma.cli.main", "segment", str(inp[case]), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctsma segment: error: "), proc.stderr
    assert not _files_under(tmp_path / "out")


# -- safety ------------------------------------------------------------------------------------------------------
def test_model_files_never_unpickle_and_carry_a_checksum(models):
    from ctsma.modelfile import load_model, read_metadata
    from safetensors import safe_open

    for path in (models["model_pickle"], models["model_tampered"]):
        with pytest.raises(ModelFileError):
            load_model(path)
    assert not Path(models["marker"]).exists()
    # the same pickle really does run code when unpickled: the test above would notice a pickle loader
    with open(models["model_pickle"], "rb") as fh:
        pickle.load(fh)  # noqa: S301 - on purpose, to prove the marker mechanism works
    assert Path(models["marker"]).exists()
    Path(models["marker"]).unlink()
    with safe_open(str(models["student"]), framework="pt") as fh:
        assert re.fullmatch(r"[0-9a-f]{64}", fh.metadata()["sha256"])
    assert read_metadata(models["student"])["kind"] == "student"


def test_source_never_loads_pickles_or_runs_shell_strings():
    """Every torch.load is weights-only; nothing unpickles; no subprocess gets a shell string."""
    offenders = []
    for root in (REPO / "src" / "ctsma", REPO / "CTSMA", REPO / "CTSMARegistration"):
        for path in root.rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{path}: torch.load without weights_only=True")
            for pat in (r"\bpickle\.loads?\(", r"shell\s*=\s*True", r"\bos\.system\(", r"\bos\.popen\(",
                        r"joblib\.load\(", r"np\.load\([^)]*allow_pickle\s*=\s*True"):
                if re.search(pat, text):
                    offenders.append(f"{path}: {pat}")
    assert not offenders, offenders


def test_subprocess_commands_are_argument_lists():
    from CTSMALib.process import ctsma_command

    cmd = ctsma_command(["segment", "a b; rm -rf /", "--out", "x"], "p.jsonl")
    assert isinstance(cmd, list) and "a b; rm -rf /" in cmd
    with pytest.raises(TypeError):
        ctsma_command("segment ct.nii --out x", "p.jsonl")


@pytest.mark.parametrize("name", ["../escape", "../../etc/evil", "/tmp/abs_evil", "a/../../b"])
def test_output_paths_cannot_escape_the_output_folder(name, inp, tmp_path, capsys):
    from ctsma.io import safe_join

    with pytest.raises(UserError, match="outside the output folder"):
        safe_join(tmp_path / "out", name)
    assert safe_join(tmp_path / "out", "sub", "ok.txt") == (tmp_path / "out" / "sub" / "ok.txt").resolve()
    # a batch manifest whose subject name tries to escape
    m = tmp_path / "batch.csv"
    m.write_text(f"subject,ct\n{name},{inp['ct']}\n")
    before = set(tmp_path.parent.rglob("*"))
    rc = cli_main(["--quiet", "infer", str(m), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot name a case folder" in err and "Traceback" not in err  # refused before any knee
    after = {p for p in set(tmp_path.parent.rglob("*")) - before if p.is_file()}
    assert not after - {*(tmp_path / "out").rglob("*")}, after


# -- fuzzing -----------------------------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(inp) -> dict:
    d = inp["dir"]
    small = _img(np.linspace(-1000, 1000, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    sitk.WriteImage(small, str(d / "seed.nii"))
    sitk.WriteImage(small, str(d / "seed.nrrd"), False)
    return {".nii": (d / "seed.nii").read_bytes(), ".nrrd": (d / "seed.nrrd").read_bytes()}


@_FUZZ
@given(data=st.data(), suffix=st.sampled_from([".nii", ".nrrd"]))
def test_fuzz_image_reader(data, suffix, seeds, tmp_path_factory):
    """Mutated or cut headers and payloads: a valid 3D finite image or a user error, never a crash."""
    from ctsma.errors import MemoryBudgetError
    from ctsma.io import read_image

    raw = bytearray(seeds[suffix])
    op = data.draw(st.sampled_from(["flip", "cut", "splice"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, min(len(raw) - 1, 400)))  # mostly the header
            raw[i] = data.draw(st.integers(0, 255))
    elif op == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(bytes(raw))
    try:
        img = read_image(path, max_voxels=10_000_000)
    except (InputImageError, MemoryBudgetError):
        return
    arr = sitk.GetArrayViewFromImage(img)
    assert img.GetDimension() == 3 and np.isfinite(arr).all()
    assert all(s > 0 for s in img.GetSpacing())


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=8))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), c, max_size=4)),
                       max_leaves=8)


@_FUZZ
@given(data=st.dictionaries(st.sampled_from(["stride_mm", "extent_mm", "ct_size", "folds", "seed", "truth",
                                             "roi_source", "unknown", "max_per_roi"]), _values, max_size=4))
def test_fuzz_config_loader_mapping(data):
    """Any mapping: a valid config or a ConfigError naming a key, never another exception."""
    from ctsma.config import load_config
    from ctsma.dataset.build import BuildSettings

    try:
        load_config(data, BuildSettings)
    except ConfigError as exc:
        assert str(exc)
        return
    for k, v in data.items():
        assert k != "unknown"


@_FUZZ
@given(text=st.text(max_size=200))
def test_fuzz_config_loader_text(text, tmp_path_factory):
    """Any YAML text in a config file: a valid config or a ConfigError, never another exception."""
    from ctsma.config import load_config
    from ctsma.models.config import TrainConfig

    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, TrainConfig)
    except ConfigError:
        pass


# -- the Slicer module logics ----------------------------------------------------------------------------------------
class InProcessRunner:
    """Runs the logic's ``ctsma`` command line in this process (the real command line, no subprocess)."""

    def start_ctsma(self, args, work_dir, env=None, **_):
        import contextlib
        import io

        self.args = list(args)
        assert all(isinstance(a, str) for a in self.args)  # an argument list, never a shell string
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            self.rc = cli_main(["--quiet", *self.args])
        self.err = buf.getvalue()

    def poll(self):
        from CTSMALib.process import DONE, FAILED, RunStatus

        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        return RunStatus(state=DONE if self.rc == 0 else FAILED, returncode=self.rc,
                         last_error=lines[-1] if lines and self.rc else "")

    cancel = poll


LOGIC_CASES = {  # case -> (volume to give as the CT, expected error)
    "nonfinite": ("nonfinite", "non-finite voxels"),
    "image_2d": ("image_2d", "is 2D"),
    "mr_as_ct": ("mr", "not plausible Hounsfield units"),
}


@pytest.mark.mrml
@pytest.mark.parametrize("start", ["startBoneSegmentation", "startAnalysis", "startRegistration"])
@pytest.mark.parametrize("case", [*LOGIC_CASES, "no_volume", "no_image_data", "missing_model", "tampered_model"])
def test_module_logics_reject_bad_volumes(start, case, models, mrml_scene, tmp_path):
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.parameters import AnalysisParameters
    from CTSMALib.registration_logic import CTSMARegistrationLogic
    from CTSMALib.volumes import sitk_to_volume_node

    def node(key, name):
        img = sitk.ReadImage(str(models[key]))
        if img.GetDimension() == 2:
            img = sitk.JoinSeries([img])  # a one-slice volume, as Slicer holds a 2D image
        return sitk_to_volume_node(img, mrml_scene, name=name)

    reg = start == "startRegistration"
    logic = (CTSMARegistrationLogic if reg else CTSMALogic)(runner_factory=InProcessRunner, work_root=tmp_path)
    mr = node("mr", "MR")
    if case in ("missing_model", "tampered_model") and start != "startAnalysis":
        pytest.skip("not applicable: only the analysis takes a model file")
    if case == "no_volume":
        with pytest.raises(InputImageError, match="select"):
            logic.startRegistration(mr, None) if reg else getattr(logic, start)(None)
        return
    if case == "no_image_data":
        empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        with pytest.raises(InputImageError, match="no image data|select"):
            logic.startRegistration(mr, empty) if reg else getattr(logic, start)(empty)
        return
    if case == "missing_model":
        with pytest.raises(ModelFileError, match="not found"):
            logic.startAnalysis(node("ct", "CT"), AnalysisParameters(modelPath=str(tmp_path / "none.safetensors")))
        return
    if case == "tampered_model":
        logic.startAnalysis(node("ct", "CT"), AnalysisParameters(modelPath=str(models["model_tampered/student"])))
        expect = "failed its checksum"
    else:
        key, expect = LOGIC_CASES[case]
        ct = node(key, "CT")
        if reg:
            from CTSMALib.parameters import RegistrationParameters
            logic.startRegistration(mr, ct, params=RegistrationParameters(preset="nosynth"))
        elif start == "startAnalysis":
            logic.startAnalysis(ct, AnalysisParameters(modelPath=str(models["student"])))
        else:
            logic.startBoneSegmentation(ct)
    status = logic.wait(timeout=60)
    assert status.state == "failed" and status.returncode == 2
    assert re.match(r"ctsma \w+: error: ", status.last_error) and re.search(expect, status.last_error), status
    assert not logic.run.outputs and not _files_under(logic.run.out_dir)
