"""CT-only inference end to end on a small phantom knee: contract outputs, exact plumbing, bad input, batch mode."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from ctsma import PARAMETER_FILE_NAMES, PARAMETERS, ROIS
from ctsma.cli.main import main as cli_main
from ctsma.models.export import build_meta, export_model
from ctsma.models.networks import PatchRegressor
from ctsma.phantom import generate_cohort, make_settings

from dicom_series import write_ct_series
from test_phantom import TINY

CONSTANT = np.array([0.31, 0.22, 0.64, 1.17])


@pytest.fixture(scope="module")
def knee(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("inf") / "cohort"
    generate_cohort(make_settings("demo", TINY), 1, 11, out, workers=1)
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    files = {k: out / row[k] for k in ("ct", "mr", "ct_bones", "ct_rois")}
    lab = sitk.ReadImage(str(files["ct_bones"]))
    files["bones_only"] = out / "bones_only.nii.gz"
    sitk.WriteImage(sitk.Threshold(lab, 0, 9, 0), str(files["bones_only"]))  # without the cartilage labels (>= 10)
    return files | {"side": row["side"], "dir": out}


def _constant_student(folder: Path, values) -> Path:
    """A student whose output is exactly ``values`` whatever the patch: its head's last layer is zero."""
    torch.manual_seed(0)
    net = PatchRegressor(2, 16, widths=(4, 8, 8, 8), head_hidden=8)
    y_mean, y_sd = np.array([0.25, 0.2, 0.7, 1.0]), np.array([0.05, 0.02, 0.1, 0.1])
    with torch.no_grad():
        last = net.head[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor((np.asarray(values) - y_mean) / y_sd, dtype=torch.float32))
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8.0, masks=True,
                      intensity_offset=0.0, intensity_scale=1000.0, target="mr", y_mean=y_mean, y_sd=y_sd,
                      training={}, metrics={})
    return export_model(folder / "student.safetensors", net, meta)


@pytest.fixture(scope="module")
def constant_student(tmp_path_factory) -> Path:
    """A student whose output is exactly CONSTANT whatever the patch."""
    return _constant_student(tmp_path_factory.mktemp("model"), CONSTANT)


DEMO_SCALE = np.array([0.22, 0.74, 1.5, 0.45])
"""Parameters on the scale of the shipped models (MR-apparent: Tb.Th about 0.74 mm), among the knees the shipped
diagnosis model learnt from, which gives knees far from them (CONSTANT's Tb.Th of 0.22 mm) no probability."""


@pytest.fixture(scope="module")
def demo_scale_student(tmp_path_factory) -> Path:
    return _constant_student(tmp_path_factory.mktemp("model"), DEMO_SCALE)


def _run(*args) -> int:
    """``ctsma infer`` with the shipped diagnosis model unless another is given (the test students are not the
    shipped one, which alone gets it by default)."""
    from ctsma.inference.engine import default_diagnosis_path

    given = "--diagnosis-model" in map(str, args)
    return cli_main(["--quiet", "infer", *map(str, args), *([] if given else
                                                           ["--diagnosis-model", str(default_diagnosis_path())])])


def test_infer_writes_the_contract_outputs(knee, constant_student, tmp_path):
    out = tmp_path / "run"
    assert _run(knee["ct"], "--out", out, "--model", constant_student, "--side", knee["side"],
                "--segmentation", knee["bones_only"]) == 0
    ct = sitk.ReadImage(str(knee["ct"]))
    rois = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "rois.nii.gz")))
    assert set(np.unique(rois)) == {0, *ROIS.values()}
    for folder in ("maps", "uncertainty"):
        for p in PARAMETERS:
            img = sitk.ReadImage(str(out / folder / f"{PARAMETER_FILE_NAMES[p]}.nii.gz"))
            assert img.GetSize() == ct.GetSize() and img.GetPixelID() == sitk.sitkFloat32
            np.testing.assert_allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(img.GetDirection(), ct.GetDirection(), atol=1e-6)
            arr = sitk.GetArrayFromImage(img)
            assert np.all(arr[rois == 0] == 0)  # documented background; mask = rois > 0
            assert np.all(arr[rois > 0] > 0) if folder == "maps" else np.all(arr >= 0)
    # a constant student gives constant maps and tables: the whole chain keeps physical units
    for j, p in enumerate(PARAMETERS):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / f"{PARAMETER_FILE_NAMES[p]}.nii.gz")))
        np.testing.assert_allclose(arr[rois > 0], CONSTANT[j], rtol=1e-5)
        unc = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{PARAMETER_FILE_NAMES[p]}.nii.gz")))
        assert unc.max() < 1e-5
    table = pd.read_csv(out / "roi_table.csv")
    assert list(table.columns) == ["roi", "parameter", "mean", "sd", "median", "iqr", "n_patches"]
    assert len(table) == 16 and (table.n_patches > 0).all()
    np.testing.assert_allclose(table.pivot(index="roi", columns="parameter", values="mean")[list(PARAMETERS)],
                               np.tile(CONSTANT, (4, 1)), rtol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_patches"] == int(table.groupby("roi").n_patches.first().sum())
    assert summary["model"]["role"] == "student_distilled" and summary["bones_from"] != "automatic"
    # the maps' colour scale for viewers (the Slicer module): the model's training references' mean ± 3 SD
    expected = {"BV/TV": [0.1, 0.4], "Tb.Th": [0.14, 0.26], "Tb.Sp": [0.4, 1.0], "Tb.N": [0.7, 1.3]}
    assert summary["display_range"].keys() == expected.keys()
    for p, r in expected.items():
        assert summary["display_range"][p] == pytest.approx(r)
    patches = pd.read_csv(out / "patches.csv")
    assert len(patches) == summary["n_patches"] and {"rel_x", "rel_y", "rel_z", *PARAMETERS} <= set(patches.columns)
    # the centres are RAS, as the summary says: flipped to LPS, each lies in its own ROI of rois.nii.gz
    assert summary["centre_frame"].startswith("RAS")
    rois = sitk.ReadImage(str(out / "rois.nii.gz"))
    labels = {"MFC": 1, "LFC": 2, "MTP": 3, "LTP": 4}
    inside = [rois[rois.TransformPhysicalPointToIndex((-r.centre_x, -r.centre_y, r.centre_z))] == labels[r.roi]
              for r in patches.itertuples()]
    assert np.mean(inside) > 0.9
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_infer_feeds_the_model_the_ct_patches_it_was_trained_on(knee, tmp_path):
    """What `infer` reports per patch is the student's prediction on the patch a training would have cut at that
    centre (SimpleITK resampling of the CT, air floored, and the patch's own ROI as the mask channel), averaged over
    the default flips; the ROI table summarises those patches and the OA probability is the diagnosis model's on
    them. A student with random weights, so that every input difference shows."""
    from ctsma import diagnosis
    from ctsma.dataset.sampling import patch_reference
    from ctsma.inference.engine import default_diagnosis_path
    from ctsma.io.images import AIR_FLOOR_HU
    from ctsma.models.export import FLIPS_DEFAULT, load_student

    torch.manual_seed(2)
    net = PatchRegressor(2, 16, widths=(4, 8, 8, 8), head_hidden=8)
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8.0, masks=True,
                      intensity_offset=0.0, intensity_scale=1000.0, target="mr", y_mean=CONSTANT,
                      y_sd=np.full(4, 30.0), training={}, metrics={})  # a wide scale: outputs vary by ~0.01
    path = export_model(tmp_path / "random.safetensors", net, meta)
    # the shipped diagnosis model without its reference ranges: this random student's parameters lie far outside
    # its knees (Tb.Sp about 6 mm), for which it gives no probability, and the probability is what is compared here
    dx = diagnosis.load(default_diagnosis_path())
    dx.metadata.pop("reference_ranges")
    dx_path = diagnosis.save(dx, tmp_path / "dx.safetensors")
    out = tmp_path / "run"
    assert _run(knee["ct"], "--out", out, "--model", path, "--segmentation", knee["bones_only"],
                "--side", knee["side"], "--diagnosis-model", dx_path) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ct_resolution"]["harmonisation_blur_mm"] == 0  # no reference in the model file: no blur
    patches = pd.read_csv(out / "patches.csv", dtype={"subject": str})
    ct, rois = sitk.ReadImage(str(knee["ct"])), sitk.ReadImage(str(out / "rois.nii.gz"))
    n = len(patches)
    x, m = np.empty((n, 1, 16, 16, 16), np.float32), np.empty((n, 1, 16, 16, 16), np.float32)
    for i, r in enumerate(patches.itertuples()):
        ref = patch_reference((-r.centre_x, -r.centre_y, r.centre_z), 16, 8.0)  # RAS -> LPS
        x[i, 0] = np.maximum(sitk.GetArrayFromImage(sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear,
                                                                  -1000.0, sitk.sitkFloat32)), AIR_FLOOR_HU)
        m[i, 0] = sitk.GetArrayFromImage(sitk.Resample(rois, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                       sitk.sitkUInt8)) == ROIS[r.roi]
    model, _ = load_student(path)
    mean, sd = model.predict_flips(x, m, FLIPS_DEFAULT)
    assert np.ptp(mean, axis=0).min() > 3e-3  # the patches differ, and so do the predictions
    np.testing.assert_allclose(patches[list(PARAMETERS)].to_numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(patches[[f"{p}.sd" for p in PARAMETERS]].to_numpy(), sd, rtol=1e-3, atol=1e-5)
    table = pd.read_csv(out / "roi_table.csv")
    for t in table.itertuples():
        v = patches.loc[patches.roi == t.roi, t.parameter]
        assert t.n_patches == len(v) and t.mean == pytest.approx(v.mean(), rel=1e-9)
        assert t.median == pytest.approx(v.median(), rel=1e-9) and t.sd == pytest.approx(v.std(ddof=1), rel=1e-6)
    pred = diagnosis.predict(diagnosis.load(dx_path), patches, subjects=[summary["subject"]])
    assert summary["oa_probability"] is not None
    assert summary["oa_probability"] == pytest.approx(float(pred.iloc[0]["oa_probability"]), rel=1e-9)


def test_infer_refuses_an_mr_and_writes_nothing(knee, constant_student, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(knee["mr"], "--out", out, "--model", constant_student) == 2
    assert "Hounsfield" in capsys.readouterr().err
    assert not out.exists()  # a refused run leaves no output folder (it did not exist before)


def test_mismatched_segmentation_is_resampled_with_a_warning_or_refused(knee, constant_student, tmp_path, capsys):
    seg = sitk.ReadImage(str(knee["bones_only"]))
    coarse = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(sitk.Shrink(seg, [2, 2, 1]), str(coarse))  # same anatomy, another grid: usable
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="resampled"):
        assert _run(knee["ct"], "--out", out, "--model", constant_student, "--segmentation", coarse,
                    "--side", knee["side"]) == 0
    # kept in summary.json too, whose warnings the patient report's notes show (it was printed only)
    warns = json.loads((out / "summary.json").read_text())["warnings"]
    assert any("coarse.nii.gz is on a different grid than the CT; resampled" in w for w in warns)
    far = sitk.Image(seg)
    far.SetOrigin(tuple(o + 500.0 for o in seg.GetOrigin()))  # does not overlap the CT at all
    bad = tmp_path / "far.nii.gz"
    sitk.WriteImage(far, str(bad))
    out2 = tmp_path / "run2"
    rc = _run(knee["ct"], "--out", out2, "--model", constant_student, "--segmentation", bad, "--side", knee["side"])
    assert rc == 2 and "does not overlap" in capsys.readouterr().err
    assert not out2.exists()  # a refused run leaves no output folder (it did not exist before)


def test_infer_refuses_tampered_model(knee, constant_student, tmp_path, capsys):
    bad = tmp_path / "m.safetensors"
    data = bytearray(Path(constant_student).read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert _run(knee["ct"], "--out", tmp_path / "run", "--model", bad) == 2
    assert "checksum" in capsys.readouterr().err


def test_a_dicom_series_gives_what_the_same_ct_as_nifti_gives(knee, tmp_path):
    """A DICOM folder (the scanner's export) is read with its geometry and SliceThickness and analysed exactly as
    the same CT in NIfTI; a folder without a DICOM series is refused."""
    ct = sitk.ReadImage(str(knee["ct"]))
    write_ct_series(ct, tmp_path / "dicom", thickness_mm=ct.GetSpacing()[2])
    common = ("--segmentation", knee["bones_only"], "--side", knee["side"])
    assert _run(knee["ct"], "--out", tmp_path / "nii", *common) == 0
    assert _run(tmp_path / "dicom", "--out", tmp_path / "dcm", *common) == 0
    a, b = (pd.read_csv(tmp_path / d / "roi_table.csv") for d in ("nii", "dcm"))
    pd.testing.assert_frame_equal(a, b)
    res = json.loads((tmp_path / "dcm" / "summary.json").read_text())["ct_resolution"]
    assert res["slice_thickness_source"] == "DICOM SliceThickness"
    assert res["slice_thickness_mm"] == pytest.approx(ct.GetSpacing()[2])
    nii = sitk.ReadImage(str(tmp_path / "nii" / "maps" / os.listdir(tmp_path / "nii" / "maps")[0]))
    dcm = sitk.ReadImage(str(tmp_path / "dcm" / "maps" / os.listdir(tmp_path / "nii" / "maps")[0]))
    assert np.allclose(nii.GetOrigin(), dcm.GetOrigin(), atol=1e-3) and nii.GetSize() == dcm.GetSize()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert _run(tmp_path / "empty", "--out", tmp_path / "e") == 2


def test_padding_outside_the_reconstruction_circle_changes_nothing(knee, tmp_path):
    """A clinical CT holds -3024 HU outside its reconstruction circle: it is analysed as the same CT with air there
    (it was refused as 'not plausible Hounsfield units' before); padding alone is refused."""
    from ctsma.errors import InputImageError
    from ctsma.io.images import check_ct_intensities

    ct = sitk.ReadImage(str(knee["ct"]))
    a = sitk.GetArrayFromImage(ct)
    ny, nx = a.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    outside = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) > min(nx, ny) / 2
    assert not (a[:, outside] > -500).any()                           # the circle leaves the leg whole
    a[:, outside] = -3024
    padded = sitk.GetImageFromArray(a)
    padded.CopyInformation(ct)
    sitk.WriteImage(padded, str(tmp_path / "padded.nii.gz"))
    common = ("--segmentation", knee["bones_only"], "--side", knee["side"])
    assert _run(knee["ct"], "--out", tmp_path / "a", *common) == 0
    assert _run(tmp_path / "padded.nii.gz", "--out", tmp_path / "b", *common) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "roi_table.csv"),
                                  pd.read_csv(tmp_path / "b" / "roi_table.csv"))
    # patches that reach padding read it as air, as the training patches do (floored at -1024 HU)
    from ctsma.dataset.sampling import cut, cut_ct

    centre = np.array([padded.TransformIndexToPhysicalPoint((1, 1, a.shape[0] // 2))], float)  # a corner: padding
    assert cut(padded, centre, 16, 8.0, default=-1000.0).min() == -3024
    assert cut_ct(padded, centre, 16, 8.0).min() == -1024
    with pytest.raises(InputImageError, match="padding only"):
        check_ct_intensities(sitk.Image(8, 8, 8, sitk.sitkInt16) - 3024)
    with pytest.raises(InputImageError, match="not plausible"):                # an MR is still no CT
        check_ct_intensities(sitk.ReadImage(str(knee["mr"])))


def test_the_results_do_not_depend_on_where_the_field_of_view_starts(knee, tmp_path):
    """Bones and ROIs are found on a coarser copy of the CT; that copy's grid is anchored in patient space, so the
    same knee with a few more air columns in front gives the same ROI table (anchored on the first voxel, a
    phantom knee went from 80 to 92 patches)."""
    from ctsma.inference.engine import InferSettings, infer

    ct = sitk.ReadImage(str(knee["ct"]))
    a = sitk.GetArrayFromImage(ct)
    s = InferSettings(side=knee["side"], segmentation_spacing_mm=(1.3, 1.3, 1.5))   # coarser than this 1-mm CT
    tables = []
    for w in (0, 1, 2):
        img = sitk.GetImageFromArray(np.concatenate([np.full_like(a[:, :, :w], -1000), a], axis=2))
        img.SetSpacing(ct.GetSpacing())
        img.SetOrigin(tuple(np.array(ct.GetOrigin()) - np.array([w * ct.GetSpacing()[0], 0.0, 0.0])))
        sitk.WriteImage(img, str(tmp_path / f"ct{w}.nii.gz"))
        infer(tmp_path / f"ct{w}.nii.gz", tmp_path / f"run{w}", settings=s, subject="k")
        tables.append(pd.read_csv(tmp_path / f"run{w}" / "roi_table.csv"))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    pd.testing.assert_frame_equal(tables[0], tables[2])


def test_the_results_do_not_depend_on_the_order_in_which_the_ct_is_stored(knee, tmp_path):
    """The same knee with its slices, or its columns, stored the other way gave other patches (the centre grid was
    anchored on the ROI's first voxel in index space): on this knee 32 instead of 20 patches in one ROI, and BV/TV
    means 0.304 against 0.292. Now the same ROI table, whatever the order."""
    from test_dataset_build import _restored

    from ctsma.inference.engine import InferSettings, infer

    ct = sitk.ReadImage(str(knee["ct"]))
    tables = []
    for name, img in (("as_written", ct), ("slices_reversed", _restored(ct, 2)), ("columns_reversed",
                                                                                _restored(ct, 0))):
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
        infer(tmp_path / f"{name}.nii.gz", tmp_path / name, settings=InferSettings(side=knee["side"]), subject="k")
        tables.append(pd.read_csv(tmp_path / name / "roi_table.csv"))
    assert tables[0]["n_patches"].sum() > 20
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t, tables[0], check_exact=False, rtol=1e-5, atol=1e-6)


def test_batch_mode_resumes_and_reports_failures(knee, constant_student, tmp_path, capsys):
    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["good", "bad"], "ct": [str(knee["ct"]), str(knee["mr"])],
                  "ct_bones": [str(knee["ct_bones"]), ""]}).to_csv(manifest, index=False)  # with cartilage (>= 10)
    out = tmp_path / "batch"
    rc = _run(manifest, "--out", out, "--model", constant_student, "--side", knee["side"])
    assert rc == 1  # one case failed, and said so, even with --quiet
    assert "ctsma infer: failed bad: " in capsys.readouterr().err
    status = json.loads((out / "batch_status_0of1.json").read_text())
    assert [s["status"] for s in status] == ["ok", "failed"] and "Hounsfield" in status[1]["message"]
    assert not (out / "bad").exists()  # no empty folder for the failed case: its reason is in the status file
    mtime = os.path.getmtime(out / "good" / "summary.json")
    _run(manifest, "--out", out, "--model", constant_student, "--side", knee["side"])
    assert os.path.getmtime(out / "good" / "summary.json") == mtime  # finished knee not redone
    status = json.loads((out / "batch_status_0of1.json").read_text())
    assert status[0]["status"] == "done earlier"
    # a rerun with other settings redoes the finished knee instead of keeping results it did not ask for
    _run(manifest, "--out", out, "--model", constant_student, "--side", knee["side"], "--stride", "6")
    status = json.loads((out / "batch_status_0of1.json").read_text())
    assert status[0]["status"] == "ok" and "redone" in status[0]["message"]
    assert json.loads((out / "good" / "summary.json").read_text())["stride_mm"] == 6.0
    # a manifest with a header only is a mistake, not an empty success
    header_only = tmp_path / "header.csv"
    header_only.write_text("ct\n")
    assert _run(header_only, "--out", tmp_path / "h", "--model", constant_student) == 2 and not (tmp_path / "h").exists()
    # shards split the cohort
    _run(manifest, "--out", tmp_path / "s1", "--model", constant_student, "--shard", "1/2")
    assert json.loads((tmp_path / "s1" / "batch_status_1of2.json").read_text())[0]["subject"] == "bad"
    # a manifest may give each CT's slice thickness (NIfTI files converted from DICOM lose it); nonsense is refused
    thick = tmp_path / "thick.csv"
    pd.DataFrame({"subject": ["good", "other"], "ct": [str(knee["ct"])] * 2,
                  "slice_thickness": [2.5, None]}).to_csv(thick, index=False)
    assert _run(thick, "--out", tmp_path / "t", "--model", constant_student, "--side", knee["side"]) == 0
    res = [json.loads((tmp_path / "t" / k / "summary.json").read_text())["ct_resolution"] for k in ("good", "other")]
    assert (res[0]["slice_thickness_mm"], res[0]["slice_thickness_source"]) == (2.5, "given")
    assert res[1]["slice_thickness_source"] == "slice spacing"
    pd.DataFrame({"ct": [str(knee["ct"])], "slice_thickness": ["1 mm"]}).to_csv(thick, index=False)
    assert _run(thick, "--out", tmp_path / "u", "--model", constant_student) == 2
    # the manifest's side column, as 'dataset build' reads it, tells each knee's side (no --side, no guess)
    sided = tmp_path / "sided.csv"
    pd.DataFrame({"subject": ["good"], "ct": [str(knee["ct"])], "side": [knee["side"].lower()]}).to_csv(sided,
                                                                                                      index=False)
    assert _run(sided, "--out", tmp_path / "v", "--model", constant_student) == 0
    summary = json.loads((tmp_path / "v" / "good" / "summary.json").read_text())
    assert (summary["side"], summary["side_from"]) == (knee["side"], "metadata")
    # written out, as 'dataset build' reads it ('Left' was refused here and taken there)
    word = {"L": "Left", "R": "Right"}[knee["side"]]
    pd.DataFrame({"subject": ["good"], "ct": [str(knee["ct"])], "side": [word]}).to_csv(sided, index=False)
    assert _run(sided, "--out", tmp_path / "w", "--model", constant_student) == 0
    summary = json.loads((tmp_path / "w" / "good" / "summary.json").read_text())
    assert (summary["side"], summary["side_from"]) == (knee["side"], "metadata")
    pd.DataFrame({"ct": [str(knee["ct"])], "side": ["middle"]}).to_csv(sided, index=False)
    assert _run(sided, "--out", tmp_path / "x", "--model", constant_student) == 2 and not (tmp_path / "x").exists()


def test_the_subject_id_can_be_given_for_one_ct(knee, constant_student, tmp_path):
    out = tmp_path / "run"
    assert _run(knee["ct"], "--out", out, "--model", constant_student, "--side", knee["side"],
                "--segmentation", knee["bones_only"], "--subject", "K 7") == 0
    assert json.loads((out / "summary.json").read_text())["subject"] == "K 7"
    assert set(pd.read_csv(out / "patches.csv", dtype={"subject": str})["subject"]) == {"K 7"}
    assert _run(knee["ct"], "--out", tmp_path / "x", "--model", constant_student, "--subject", " ") == 2


def test_infer_over_the_memory_budget_blends_in_z_slabs_with_the_same_outputs(knee, tmp_path, monkeypatch, capsys):
    """Under a budget below the whole-CT estimate the maps are blended and streamed slab by slab (demo model:
    varied predictions), every output equal to the whole run's; below the smallest slab the CT is refused."""
    args = (knee["ct"], "--side", knee["side"], "--segmentation", knee["bones_only"])
    assert _run(*args, "--out", tmp_path / "whole") == 0
    n = int(np.prod(sitk.ReadImage(str(knee["ct"])).GetSize()))
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(20 * n / 1e9))  # estimate 32 B/voxel; 16 for reading and segmenting
    capsys.readouterr()
    assert cli_main(["infer", *map(str, args), "--out", str(tmp_path / "part")]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    n_slabs = len(re.findall(r"^maps slab \d+/\d+: planes \d+-\d+$", err, re.M))
    assert summary["slab_planes"] >= 1 and n_slabs > 1, err
    for folder in ("maps", "uncertainty"):
        for p in PARAMETERS:
            a = sitk.ReadImage(str(tmp_path / "whole" / folder / f"{PARAMETER_FILE_NAMES[p]}.nii.gz"))
            b = sitk.ReadImage(str(tmp_path / "part" / folder / f"{PARAMETER_FILE_NAMES[p]}.nii.gz"))
            for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection", "GetPixelIDValue"):
                assert getattr(a, get)() == getattr(b, get)()
            np.testing.assert_array_equal(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a))
    for p in PARAMETERS:  # the demo model's maps vary (so the equalities above compare real values)
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "whole" / "maps" / f"{PARAMETER_FILE_NAMES[p]}.nii.gz")))
        assert np.ptp(m[np.isfinite(m) & (m > 0)]) > 0, p
    for name in ("roi_table.csv", "patches.csv"):
        assert (tmp_path / "part" / name).read_text() == (tmp_path / "whole" / name).read_text()
    for name in ("rois.nii.gz", "bones.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "part" / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "whole" / name))))
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(8 * n / 1e9))  # below reading and segmenting the CT
    rc = _run(*args, "--out", tmp_path / "refused")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "z-slabs" in lines[0] and "CTSMA_MEMORY_GB" in lines[0], lines
    assert not (tmp_path / "refused").exists()


def test_infer_releases_the_ct_during_roi_placement_over_the_budget(knee, tmp_path, monkeypatch):
    """When bones and ROIs are found on a coarse copy, a run over the budget releases the CT's pixels meanwhile
    and reads them again for the patches: the outputs are those of the whole run."""
    from ctsma.inference.engine import InferSettings, infer

    s = InferSettings(side=knee["side"], segmentation_spacing_mm=(1.2, 1.2, 1.5))  # coarser than this CT
    infer(knee["ct"], tmp_path / "whole", settings=s)
    n = int(np.prod(sitk.ReadImage(str(knee["ct"])).GetSize()))
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(20 * n / 1e9))
    import ctsma.inference.engine as engine
    reads = []
    real_read = engine.read_image
    monkeypatch.setattr(engine, "read_image", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    summary = infer(knee["ct"], tmp_path / "part", settings=s)
    assert summary["slab_planes"] >= 1 and len(reads) == 2  # read, released, read again for the patches
    for name in ("rois.nii.gz", "bones.nii.gz", "maps/tbth.nii.gz", "uncertainty/bvtv.nii.gz"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "part" / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "whole" / name))))
    assert (tmp_path / "part" / "patches.csv").read_text() == (tmp_path / "whole" / "patches.csv").read_text()


def test_infer_tells_the_side_of_a_phantom_knee_from_its_fused_fibular_head(knee, constant_student, tmp_path):
    """The phantom's fibular head abuts the tibia, so the segmentation fuses them: without --side the side comes
    from the lobe the head leaves on the tibia, with a warning kept in the summary; --side is recorded as such."""
    assert _run(knee["ct"], "--out", tmp_path / "a", "--model", constant_student) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["side"] == knee["side"] and summary["side_from"] == "anatomy (fibular head fused to the tibia)"
    assert any("shape of the proximal tibia" in w for w in summary["warnings"])
    assert _run(knee["ct"], "--out", tmp_path / "b", "--model", constant_student, "--side", knee["side"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["side_from"] == "metadata" and not summary["warnings"]


def _student_with_reference(path: Path, sigma_mm: float, slice_mm: float, intensity: dict | None = None) -> Path:
    """A student with random weights (its outputs follow the patches) whose file records training CTs of in-plane
    edge sigma ``sigma_mm`` and slice spacing ``slice_mm`` (and, with ``intensity``, their knees' bone
    intensity)."""
    torch.manual_seed(1)
    net = PatchRegressor(2, 16, widths=(4, 8, 8, 8), head_hidden=8)
    meta = build_meta("student_distilled", net, modality="ct", spacing_mm=0.5, extent_mm=8.0, masks=True,
                      intensity_offset=0.0, intensity_scale=1000.0, target="mr", y_mean=np.full(4, 0.5),
                      y_sd=np.full(4, 0.1), training={}, metrics={},
                      ct_reference={"inplane_edge_sigma_mm": sigma_mm, "slice_spacing_mm": slice_mm},
                      ct_intensity=intensity)
    return export_model(path, net, meta)


def test_a_ct_sharper_than_the_training_cts_is_blurred_to_them_before_the_patches(knee, tmp_path, capsys):
    from ctsma.harmonise import inplane_edge_sigma

    ct = sitk.ReadImage(str(knee["ct"]))
    est = inplane_edge_sigma(ct)["sigma_mm"]
    dz = ct.GetSpacing()[2]
    common = ("--segmentation", knee["bones_only"], "--side", knee["side"])
    model = _student_with_reference(tmp_path / "ref.safetensors", est + 0.25, dz)
    assert _run(knee["ct"], "--out", tmp_path / "a", "--model", model, *common) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    res = a["ct_resolution"]
    assert res["inplane_edge_sigma_mm"] == pytest.approx(est, abs=1e-3)
    assert res["model_inplane_edge_sigma_mm"] == pytest.approx(est + 0.25)
    assert res["harmonisation_blur_mm"] == pytest.approx(np.sqrt((est + 0.25) ** 2 - est ** 2), rel=0.15)
    assert res["inplane_edge_sigma_after_mm"] == pytest.approx(est + 0.25, abs=0.006) and not a["warnings"]
    assert cli_main(["infer", str(knee["ct"]), "--out", str(tmp_path / "a2"), "--model", str(model),
                     *map(str, common)]) == 0
    assert "blurred in-plane by" in capsys.readouterr().err          # the command line says so too
    assert _run(knee["ct"], "--out", tmp_path / "b", "--model", model, "--no-harmonise", *common) == 0
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["ct_resolution"]["harmonisation_blur_mm"] == 0
    assert len(b["warnings"]) == 1 and "sharper in-plane" in b["warnings"][0]
    # the same patches, cut from the blurred CT in the first run only
    pa, pb = pd.read_csv(tmp_path / "a" / "patches.csv"), pd.read_csv(tmp_path / "b" / "patches.csv")
    assert pa[["centre_x", "centre_y", "centre_z"]].equals(pb[["centre_x", "centre_y", "centre_z"]])
    assert not pa[list(PARAMETERS)].equals(pb[list(PARAMETERS)])      # (a random net: small differences)
    # a softer CT than the training CTs, with thicker slices: used as it is, with two warnings
    soft = _student_with_reference(tmp_path / "soft.safetensors", est / 2, dz / 2)
    assert _run(knee["ct"], "--out", tmp_path / "c", "--model", soft, *common) == 0
    c = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert c["ct_resolution"]["harmonisation_blur_mm"] == c["ct_resolution"]["through_plane_blur_mm"] == 0
    assert len(c["warnings"]) == 2 and "softer in-plane" in c["warnings"][0] and "thicker" in c["warnings"][1]
    assert pd.read_csv(tmp_path / "c" / "patches.csv")[list(PARAMETERS)].equals(pb[list(PARAMETERS)])
    # thinner slices than the training CTs': blurred along z only, said on the command line
    thin = _student_with_reference(tmp_path / "thin.safetensors", est, dz * 2)
    assert cli_main(["infer", str(knee["ct"]), "--out", str(tmp_path / "d"), "--model", str(thin),
                     *map(str, common)]) == 0
    assert "blurred along z by" in capsys.readouterr().err
    d = json.loads((tmp_path / "d" / "summary.json").read_text())["ct_resolution"]
    assert d["harmonisation_blur_mm"] == 0 and d["through_plane_blur_mm"] > 0.3
    pd_ = pd.read_csv(tmp_path / "d" / "patches.csv")
    assert pd_[["centre_x", "centre_y", "centre_z"]].equals(pb[["centre_x", "centre_y", "centre_z"]])
    assert not pd_[list(PARAMETERS)].equals(pb[list(PARAMETERS)])
    # a thickness given on the command line (a NIfTI exported from DICOM): 2 x the slice spacing, as thick as the
    # training CTs' slices but less interpolated, so it is still blurred a little; nonsense is refused
    assert cli_main(["infer", str(knee["ct"]), "--out", str(tmp_path / "e"), "--model", str(thin),
                     "--slice-thickness", str(2 * dz), *map(str, common)]) == 0
    e = json.loads((tmp_path / "e" / "summary.json").read_text())["ct_resolution"]
    assert e["slice_thickness_source"] == "given" and 0 < e["through_plane_blur_mm"] < d["through_plane_blur_mm"]
    capsys.readouterr()
    assert cli_main(["infer", str(knee["ct"]), "--out", str(tmp_path / "f"), "--slice-thickness", "nan"]) == 2
    assert "--slice-thickness must be" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_a_ct_whose_bone_is_unlike_the_training_knees_gets_a_warning(knee, tmp_path):
    common = ("--segmentation", knee["bones_only"], "--side", knee["side"])
    model = _student_with_reference(tmp_path / "m.safetensors", 0.3, 1.0)
    assert _run(knee["ct"], "--out", tmp_path / "a", "--model", model, *common) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    value = a["ct_intensity"]["knee_hu"]     # a model without the record: the value, nothing compared
    assert a["ct_intensity"]["model_reference"] is None and not [w for w in a["warnings"] if "training knees" in w]
    patches = pd.read_csv(tmp_path / "a" / "patches.csv")
    assert len(patches) == a["n_patches"] and 0 < value < 1500
    for name, rng_hu, warned in (("in", [value - 50, value + 30], False), ("far", [value - 400, value - 300], True)):
        path = _student_with_reference(tmp_path / f"{name}.safetensors", 0.3, 1.0,
                                       intensity={"knee_mean_hu": float(np.mean(rng_hu)), "knee_sd_hu": 20.0,
                                                  "knee_range_hu": rng_hu, "n_knees": 7})
        assert _run(knee["ct"], "--out", tmp_path / name, "--model", path, *common) == 0
        b = json.loads((tmp_path / name / "summary.json").read_text())
        assert b["ct_intensity"]["knee_hu"] == pytest.approx(value) and b["ct_intensity"]["model_knee_range_hu"] == rng_hu
        told = [w for w in b["warnings"] if "brighter than the model's training knees" in w]
        assert len(told) == (1 if warned else 0)
        # the warning changes nothing else
        assert pd.read_csv(tmp_path / name / "patches.csv").equals(patches)


def test_patient_report_from_a_real_infer_folder(knee, demo_scale_student, tmp_path, monkeypatch):
    """`ctsma report patient` on what `infer` writes: the OA probability and the model's CV metrics land in their
    rows (no raw JSON), the provenance is readable, and the analysis notes carry infer's warnings."""
    from ctsma.report import patient_figures

    for name in ("maps_figure", "overview_figure"):  # the text is what matters here
        monkeypatch.setattr(patient_figures, name, lambda *a, **k: None)
    out = tmp_path / "run"
    assert _run(knee["ct"], "--out", out, "--model", demo_scale_student) == 0  # side from anatomy: a warning
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oa_probability"] is not None and summary["warnings"]
    assert cli_main(["--quiet", "report", "patient", str(knee["ct"]), str(out), "--format", "html"]) == 0
    html = next((out / "report").glob("*.html")).read_text(encoding="utf-8")
    # this knee's probability in its row of the result table (a bare "73" could be any number on the page)
    assert re.search(rf'<td class="L">OA probability</td><td class="R">{100 * summary["oa_probability"]:.0f} %</td>',
                     html), html[:2000]
    assert "cv_metrics" not in html and "{&quot;" not in html and '{"' not in html
    assert "Analysis notes" in html and "Knee side" in html and "docs/" not in html
    assert "Role" in html and "student_distilled" in html   # (this test model records no training knees)
    # the shipped diagnosis model carries its cohort's non-OA ranges: every ROI mean gets a z-score
    ranged = {(r["roi"], r["parameter"]) for r in summary["reference_ranges"]}
    assert ranged == {(r, p) for r in ROIS for p in PARAMETERS}
    r = summary["reference_ranges"][0]
    mean = next(x["mean"] for x in summary["roi_table"] if x["roi"] == r["roi"] and x["parameter"] == r["parameter"])
    assert f"{(mean - r['mean']) / r['sd']:+.2f}" in html
    # infer again into the folder (another CT, other settings): the report of the replaced results goes, a user's
    # own file in report/ stays
    report = next((out / "report").glob("*.html"))
    (out / "report" / "notes.txt").write_text("mine")
    assert _run(knee["ct"], "--out", out, "--model", demo_scale_student, "--stride", "5") == 0
    assert not report.exists() and (out / "report" / "notes.txt").read_text() == "mine"


def test_a_users_own_student_gets_no_diagnosis_from_the_shipped_model(knee, constant_student, tmp_path):
    """The shipped diagnosis model learnt from the shipped student's parameters: with another student and no
    --diagnosis-model, infer gives no OA probability, says why, and the report names no diagnosis model."""
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="no diagnosis model: the shipped one learnt from the shipped student"):
        rc = cli_main(["--quiet", "infer", str(knee["ct"]), "--out", str(out), "--model", str(constant_student),
                       "--side", knee["side"], "--segmentation", str(knee["bones_only"])])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diagnosis"] is None and "oa_probability" not in summary and "reference_ranges" not in summary
    assert any(w.startswith("no diagnosis model") for w in summary["warnings"])
    assert summary["model"]["demo"] is False
    # the shipped diagnosis model, asked for, makes the report a demonstration one, and names it
    from ctsma.inference.engine import default_diagnosis_path
    from ctsma.report.patient import inputs_from_summary, is_demo

    assert _run(knee["ct"], "--out", tmp_path / "run2", "--model", constant_student, "--side", knee["side"],
                "--segmentation", knee["bones_only"]) == 0
    prov = inputs_from_summary(json.loads((tmp_path / "run2" / "summary.json").read_text()))["provenance"]
    assert is_demo(prov) and prov["diagnosis_model"] == str(default_diagnosis_path())


def test_the_diagnosis_models_reference_ranges_give_the_patient_report_its_z_scores(knee, constant_student,
                                                                                      tmp_path, monkeypatch):
    """`infer` passes on the non-OA ranges its diagnosis model carries, and `report patient` turns them into each
    ROI mean's z-score: (the knee's mean - the range's mean) / its SD."""
    from ctsma import diagnosis as dg
    from ctsma.diagnosis.synthetic import synthetic_cohort
    from ctsma.report import patient_figures

    for name in ("maps_figure", "overview_figure"):
        monkeypatch.setattr(patient_figures, name, lambda *a, **k: None)
    table, labels = synthetic_cohort(12, 3, seed=4)
    model_path = dg.save(dg.train(table, labels, "logistic", folds=None), tmp_path / "dx.safetensors")
    ranges = dg.load(model_path).metadata["reference_ranges"]
    assert len(ranges) == len(ROIS) * len(PARAMETERS)
    out = tmp_path / "run"
    assert _run(knee["ct"], "--out", out, "--model", constant_student, "--side", knee["side"],
                "--segmentation", knee["bones_only"], "--diagnosis-model", model_path) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_ranges"] == ranges and "non-OA knees" in summary["reference_description"]
    assert cli_main(["--quiet", "report", "patient", str(knee["ct"]), str(out), "--format", "html"]) == 0
    html = next((out / "report").glob("*.html")).read_text(encoding="utf-8")
    r = next(r for r in ranges if r["roi"] == "LTP" and r["parameter"] == "Tb.Sp")
    z = (CONSTANT[PARAMETERS.index("Tb.Sp")] - r["mean"]) / r["sd"]   # the constant student's ROI mean
    assert f"{z:+.2f}" in html and "Non-OA reference" in html


def test_a_thin_roi_gets_patches_with_less_of_it_and_a_warning(knee, constant_student, tmp_path):
    """Patches hold at least half of their ROI, as in training; an ROI too thin for that (here MFC, 2 slices of
    1.5 mm under 8-mm patches: at most 38 %) takes patches holding at least 30 % of it, with a warning."""
    rois = sitk.ReadImage(str(knee["ct_rois"]))
    arr = sitk.GetArrayFromImage(rois)
    z, y, x = np.argwhere(arr == ROIS["MFC"]).mean(0).round().astype(int)
    arr[arr == ROIS["MFC"]] = 0
    arr[z:z + 2, y - 10:y + 10, x - 10:x + 10] = ROIS["MFC"]
    thin = sitk.GetImageFromArray(arr)
    thin.CopyInformation(rois)
    sitk.WriteImage(thin, str(tmp_path / "thin.nii.gz"))
    out = tmp_path / "run"
    assert _run(knee["ct"], "--out", out, "--model", constant_student, "--side", knee["side"],
                "--segmentation", knee["bones_only"], "--rois", tmp_path / "thin.nii.gz") == 0
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "roi_table.csv").groupby("roi").n_patches.first()
    assert table["MFC"] > 0 and all(table[r] > 0 for r in ROIS)
    assert [w for w in summary["warnings"] if w.startswith("ROI MFC is thin")]
    assert not [w for w in summary["warnings"] if w.startswith(("ROI LFC", "ROI MTP", "ROI LTP"))]


def test_a_folder_of_knee_folders_is_refused_with_the_way_to_run_it(knee, constant_student, tmp_path, capsys):
    """The phantom's layout (DIR/P0000/ct.nii.gz, DIR/manifest.csv), as a researcher keeps a cohort: it was read as
    one DICOM folder and refused as 'a folder with no DICOM series in it' (with --shard: '--shard needs a folder or
    manifest of CTs'), without saying how to run a batch."""
    cohort = tmp_path / "cohort"
    (cohort / "k1").mkdir(parents=True)
    (cohort / "k1" / "ct.nii.gz").write_bytes(knee["ct"].read_bytes())
    (cohort / "manifest.csv").write_text("subject,ct\nk1,k1/ct.nii.gz\n")
    capsys.readouterr()
    assert _run(cohort, "--out", tmp_path / "out", "--model", constant_student, "--shard", "0/2") == 2
    err = capsys.readouterr().err
    assert "only subfolders with images in them (k1/ct.nii.gz, ...)" in err and "CSV manifest" in err
    assert str(cohort / "manifest.csv") in err and not (tmp_path / "out").exists()


def test_rois_that_a_coarse_stride_misses_are_not_called_thin(knee, constant_student, tmp_path, capsys):
    """The ROIs of this knee hold patches at every stride up to 8 mm; a 10-mm grid gives MFC patches only and a
    12-mm one none. The warning called LFC, MTP and LTP 'too thin for 30% of a patch' and asked to check the ROI
    segmentation, and the error said the ROIs were 'thinner than a patch': the stride missed them."""
    common = ["--model", constant_student, "--side", knee["side"], "--segmentation", knee["bones_only"],
              "--rois", knee["ct_rois"]]
    assert _run(knee["ct"], "--out", tmp_path / "s10", "--stride", "10", *common) == 0
    said = " ".join(json.loads((tmp_path / "s10" / "summary.json").read_text())["warnings"])
    assert "LFC: no centre of the 10-mm patch grid (--stride)" in said and "use a smaller --stride" in said
    assert "thin" not in said and "check the ROI segmentation" not in said
    capsys.readouterr()
    assert _run(knee["ct"], "--out", tmp_path / "s12", "--stride", "12", *common) == 2
    err = capsys.readouterr().err
    assert "no centre of the 12-mm patch grid" in err and "thinner" not in err and not (tmp_path / "s12").exists()


@pytest.mark.parametrize("seed", range(6))
def test_labels_copied_to_the_ct_grid_equal_a_whole_grid_resampling(seed):
    """_to_grid resamples only around the labels' box and pastes it into zeros: the same voxels as ITK's
    nearest-neighbour resampling of the whole grid, on oblique grids and labels that reach past the field of view.
    Where a CT voxel centre lies exactly half-way between label voxels (commensurate grids, made common here on
    purpose) either neighbour is nearest, and floating-point rounding in ITK's scan-line stepping picks one: there
    it must be one of the neighbours' labels."""
    from ctsma.inference.engine import _to_grid

    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.4, 0.4) if seed % 2 else 0.0
    c, s = np.cos(a), np.sin(a)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    coarse = sitk.Image([40, 36, 30], sitk.sitkUInt8)
    coarse.SetSpacing((0.7, 0.7, 1.0))
    coarse.SetOrigin(tuple(rng.choice([0.0, 0.35, -12.25], 3)))
    coarse.SetDirection(direction)
    arr = np.zeros((30, 36, 40), np.uint8)
    lo = rng.integers(0, 15, 3)
    arr[lo[0]:lo[0] + 12, lo[1]:lo[1] + 15, lo[2]:lo[2] + 20] = rng.integers(0, 5, (12, 15, 20))
    if seed == 5:
        arr[:, :, -3:] = 4  # labels on the coarse grid's last columns: past the fine grid's field of view
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(coarse)
    fine = sitk.Image([60, 55, 41], sitk.sitkUInt8)
    fine.SetSpacing((0.4, 0.45, 0.7))
    fine.SetOrigin(tuple(np.asarray(coarse.GetOrigin()) + rng.choice([0.0, 0.15, 0.2, -0.35], 3)))
    fine.SetDirection(direction if seed != 4 else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    want = sitk.Resample(lab, fine.GetSize(), sitk.Transform(), sitk.sitkNearestNeighbor, fine.GetOrigin(),
                         fine.GetSpacing(), fine.GetDirection(), 0, sitk.sitkUInt8)
    got = sitk.GetArrayFromImage(_to_grid(lab, fine))
    want = sitk.GetArrayFromImage(want)
    assert want.any()
    ijk = np.indices(want.shape).reshape(3, -1)[::-1].T  # (x, y, z) indices of every fine voxel
    d_f, d_l = (np.asarray(im.GetDirection()).reshape(3, 3) for im in (fine, lab))
    pts = np.asarray(fine.GetOrigin()) + (ijk * np.asarray(fine.GetSpacing())) @ d_f.T
    ci = ((pts - np.asarray(lab.GetOrigin())) @ d_l) / np.asarray(lab.GetSpacing())  # continuous (x, y, z)
    tie = (np.abs(ci - np.floor(ci) - 0.5) < 1e-6).any(1).reshape(want.shape)
    assert np.array_equal(got[~tie], want[~tie])
    padded = np.pad(arr, 1)
    for (z, y, x), c in zip(np.argwhere(tie), ci[tie.ravel()]):
        lo = np.floor(c).astype(int) + 1  # (x, y, z) in the padded array
        near = padded[lo[2]:lo[2] + 2, lo[1]:lo[1] + 2, lo[0]:lo[0] + 2] if (lo >= 0).all() else np.zeros(1)
        assert got[z, y, x] in near
    img = _to_grid(lab, fine)
    assert img.GetOrigin() == fine.GetOrigin() and img.GetSpacing() == fine.GetSpacing()
    assert img.GetDirection() == fine.GetDirection()
    empty = sitk.Image(lab.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(lab)
    assert not sitk.GetArrayViewFromImage(_to_grid(empty, fine)).any()


def test_no_oa_probability_from_an_incomplete_set_of_rois(knee, constant_student, tmp_path):
    """ROIs that leave a compartment without patches (here the femoral ones erased, as ROIs from another knee or a
    partial segmentation would) still give maps and a table for the rest, but no OA probability: the diagnosis
    model learnt from all four compartments."""
    rois = sitk.ReadImage(str(knee["ct_rois"]))
    arr = sitk.GetArrayFromImage(rois)
    arr[(arr == ROIS["MFC"]) | (arr == ROIS["LFC"])] = 0
    tibial = sitk.GetImageFromArray(arr)
    tibial.CopyInformation(rois)
    sitk.WriteImage(tibial, str(tmp_path / "tibial.nii.gz"))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="no OA probability: ROI.s. MFC, LFC have no valid patch"):
        assert _run(knee["ct"], "--out", out, "--model", constant_student, "--rois", tmp_path / "tibial.nii.gz",
                    "--side", knee["side"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oa_probability"] is None and "MFC, LFC" in summary["diagnosis"]["message"]
    # said even without a diagnosis, and kept for the report's notes (an empty ROI gave empty rows silently)
    assert "ROI(s) MFC, LFC have no patch (MFC empty; LFC empty)" in " ".join(summary["warnings"])
    table = pd.read_csv(out / "roi_table.csv")
    assert (table[table.roi.isin(["MTP", "LTP"])].n_patches > 0).all()
    assert (table[table.roi.isin(["MFC", "LFC"])].n_patches == 0).all()
    # one rule: 'ctsma diagnose predict' on this knee's patches, with the same model, gives no probability either,
    # and the same message (it used to fill the femoral ROIs in and give one)
    from ctsma.inference.engine import default_diagnosis_path

    with pytest.warns(UserWarning, match="1 of 1 knee.s. got no OA probability"):
        assert cli_main(["--quiet", "diagnose", "predict", "--model", str(default_diagnosis_path()), "--patches",
                         str(out / "patches.csv"), "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"subject": str}, keep_default_na=False).iloc[0]
    assert pred["oa_probability"] == "" and pred["message"] == summary["diagnosis"]["message"]


def test_a_ct_replaced_at_the_same_path_is_a_new_request(tmp_path):
    """Batch mode keeps a finished case whose recorded request equals the new one: a CT exported again at the same
    path (another size, a later time) must not look the same."""
    from ctsma.inference.engine import InferSettings, request_record
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x" * 100)
    first = request_record(ct, {"_sha256": "m"}, InferSettings(), None, None, None, model_path=None)
    assert request_record(ct, {"_sha256": "m"}, InferSettings(), None, None, None, model_path=None) == first
    ct.write_bytes(b"y" * 120)
    assert request_record(ct, {"_sha256": "m"}, InferSettings(), None, None, None, model_path=None) != first


def test_a_diagnosis_model_replaced_by_one_of_the_same_size_and_time_is_a_new_request(tmp_path):
    """The diagnosis model was stamped by its size and modification time: another model of the same size copied over
    it with its time kept (cp -p, rsync -t) left every finished knee 'done earlier', with the old model's OA
    probability. Its bytes stamp it now, so a file only touched is no new model either."""
    from ctsma.inference.engine import InferSettings, request_record

    dx = tmp_path / "dx.safetensors"
    dx.write_bytes(b"a" * 100)
    st = dx.stat()

    def record():
        return request_record(tmp_path / "ct.nii.gz", {"_sha256": "m"}, InferSettings(), None, None, dx,
                              model_path=None)

    first = record()
    dx.write_bytes(b"b" * 100)
    os.utime(dx, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (dx.stat().st_size, dx.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert record() != first
    dx.write_bytes(b"a" * 100)
    os.utime(dx, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the first model again, touched
    assert record() == first


def test_a_batch_rerun_redoes_knees_whose_diagnosis_model_was_retrained_at_the_same_path(knee, constant_student,
                                                                                          tmp_path):
    """The request recorded the diagnosis model's path only: a model retrained into the same file (new labels, another
    aggregator) left every finished knee 'done earlier' with the old model's OA probability."""
    from ctsma import diagnosis as dg
    from ctsma.diagnosis.synthetic import synthetic_cohort

    table, labels = synthetic_cohort(12, 3, seed=4)
    dx = tmp_path / "dx.safetensors"
    dg.save(dg.train(table, labels, "logistic", folds=None), dx)
    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["k1"], "ct": [str(knee["ct"])], "ct_bones": [str(knee["bones_only"])],
                  "side": [knee["side"]]}).to_csv(manifest, index=False)
    out = tmp_path / "batch"
    args = (manifest, "--out", out, "--model", constant_student, "--diagnosis-model", dx)
    assert _run(*args) == 0
    first = json.loads((out / "k1" / "summary.json").read_text())["oa_probability"]
    assert _run(*args) == 0
    assert json.loads((out / "batch_status_0of1.json").read_text())[0]["status"] == "done earlier"
    before = dx.stat()
    dg.save(dg.train(table, labels.assign(oa=1 - labels["oa"]), "logistic", folds=None), dx)  # retrained in place
    os.utime(dx, ns=(before.st_atime_ns, before.st_mtime_ns))  # and its time kept, as cp -p or rsync -t would
    assert _run(*args) == 0
    status = json.loads((out / "batch_status_0of1.json").read_text())[0]
    assert status["status"] == "ok" and "redone" in status["message"]
    again = json.loads((out / "k1" / "summary.json").read_text())["oa_probability"]
    assert again != first
    # records written before the diagnosis model was stamped by its size and time, or at all, are still honoured
    # (an upgrade redoes nothing)
    summary = json.loads((out / "k1" / "summary.json").read_text())
    stamps = summary["request"]["stamps"]
    del stamps["diagnosis_model_sha256"]
    from ctsma.io.atomic import input_stamp

    for old in ({"diagnosis_model": input_stamp(dx)}, {}):  # (the model as it is: see the next test for one since
        # retrained)
        (out / "k1" / "summary.json").write_text(json.dumps({**summary, "request": {**summary["request"],
                                                                                     "stamps": {**stamps, **old}}}))
        assert _run(*args) == 0
        assert json.loads((out / "batch_status_0of1.json").read_text())[0]["status"] == "done earlier"


def test_a_batch_rerun_redoes_knees_whose_student_metadata_changed(knee, constant_student, tmp_path):
    """The student was recorded by its weights' checksum only (model_sha256): a student file whose metadata changed
    (here its target normalisation, which scales every output) left each finished knee 'done earlier', with the
    old metadata's values. Its file's bytes stamp it now; records from before that stamp redo nothing."""
    from ctsma.modelfile import load_model, save_model

    tensors, meta = load_model(constant_student)
    kept = {k: v for k, v in meta.items() if not k.startswith("_") and k not in ("kind", "ctsma_version")}
    student = tmp_path / "student.safetensors"

    def write_student(shift):  # the same weights, another target normalisation
        norm = meta["target_normalisation"]
        save_model(student, tensors, {**kept, "target_normalisation": {**norm, "mean": [m + shift for m in
                                                                                         norm["mean"]]}},
                   kind="student")

    write_student(0.0)
    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["k1"], "ct": [str(knee["ct"])], "ct_bones": [str(knee["bones_only"])],
                  "side": [knee["side"]]}).to_csv(manifest, index=False)
    out = tmp_path / "batch"
    args = (manifest, "--out", out, "--model", student)

    def means():
        return pd.read_csv(out / "k1" / "roi_table.csv")["mean"].tolist()

    assert _run(*args) == 0
    first, weights = means(), json.loads((out / "k1" / "summary.json").read_text())["request"]["model_sha256"]
    assert _run(*args) == 0
    assert json.loads((out / "batch_status_0of1.json").read_text())[0]["status"] == "done earlier"
    write_student(0.05)
    assert _run(*args) == 0
    status = json.loads((out / "batch_status_0of1.json").read_text())[0]
    assert status["status"] == "ok" and "redone" in status["message"]
    summary = json.loads((out / "k1" / "summary.json").read_text())
    assert summary["request"]["model_sha256"] == weights  # the weights' checksum alone could not tell
    assert means() == pytest.approx([v + 0.05 for v in first])
    # a record from before the student file was stamped is compared without that stamp: an upgrade redoes nothing
    del summary["request"]["stamps"]["student_model_sha256"]
    (out / "k1" / "summary.json").write_text(json.dumps(summary))
    assert _run(*args) == 0
    assert json.loads((out / "batch_status_0of1.json").read_text())[0]["status"] == "done earlier"


def test_manifest_subjects_that_cannot_name_a_case_folder(knee, constant_student, tmp_path):
    """An empty 'subject' cell named the knee 'nan' (folder DIR/nan, subject null in the status); a subject such as
    ../x stopped the batch when its turn came, after earlier knees, leaving the last run's status file."""
    from ctsma.errors import UserError
    from ctsma.inference.batch import list_cases

    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["k1", None, "  k3 "], "ct": [str(knee["ct"])] * 3}).to_csv(manifest, index=False)
    assert list(list_cases(manifest)["subject"]) == ["k1", Path(knee["ct"]).parent.name, "k3"]
    for bad in ("../x", "a/b", ".."):
        pd.DataFrame({"subject": ["k1", bad], "ct": [str(knee["ct"])] * 2}).to_csv(manifest, index=False)
        assert _run(manifest, "--out", tmp_path / "out", "--model", constant_student) == 2
        assert not (tmp_path / "out").exists()  # refused before the first knee
    # names that Windows (or a case-insensitive file system) cannot hold apart, for outputs copied there
    for names, why in ((["k1", "CON"], "device name"), (["k1", "nul.knee"], "device name"),
                       (["k1", "a:b"], "control characters"), (["k1", "k2."], "trailing dot"),
                       (["P01", "p01"], "letter case aside")):
        pd.DataFrame({"subject": names, "ct": [str(knee["ct"])] * 2}).to_csv(manifest, index=False)
        with pytest.raises(UserError, match=why):
            list_cases(manifest)
    pd.DataFrame({"subject": ["k1", "console", "k.2"], "ct": [str(knee["ct"])] * 3}).to_csv(manifest, index=False)
    assert list(list_cases(manifest)["subject"]) == ["k1", "console", "k.2"]  # not device names


def _fake_infer(behaviour):
    """A stand-in for `infer` in batch mode: per subject, warn, fail, stop (Ctrl-C) or finish with a summary (with
    no OA probability for lack of MFC patches: 'incomplete')."""
    from ctsma.errors import InputImageError
    from ctsma.inference import engine
    from ctsma.io import write_json

    def fake(ct, out, *, subject, settings, model_path=None, segmentation=None, diagnosis_path=None):
        what = behaviour.get(subject, "ok")
        if what == "warn":
            import warnings
            warnings.warn("knee side R inferred from the shape of the proximal tibia", stacklevel=2)
        if what == "fail":
            raise InputImageError(f"cannot read CT {ct}")
        if what == "stop":
            raise KeyboardInterrupt
        from ctsma.models.export import load_student
        _, meta = load_student(model_path)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"request": engine.request_record(ct, meta, settings, segmentation, None, diagnosis_path,
                                                    model_path=model_path), "oa_probability": 0.5, "diagnosis": {}}
        if what == "incomplete":
            from ctsma.diagnosis.data import incomplete_knee_message

            summary.update(oa_probability=None, diagnosis={"message": incomplete_knee_message(["MFC"])})
        write_json(out / "summary.json", summary)
        return summary
    return fake


def test_a_batch_names_the_knee_of_each_warning_and_keeps_its_status_file_current(knee, constant_student, tmp_path,
                                                                                 monkeypatch):
    """Warnings named no knee, and the same warning of a second knee was not shown at all (Python's once per place);
    the status file was written only at the end, so a killed batch left the previous run's status claiming 'ok'."""
    from ctsma.inference import batch

    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["k1", "k2", "k3"], "ct": [str(knee["ct"])] * 3}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    behaviour = {"k1": "warn", "k2": "warn"}
    monkeypatch.setattr(batch, "infer", _fake_infer(behaviour))
    args = ["infer", str(manifest), "--out", str(out), "--model", str(constant_student)]
    with pytest.warns(UserWarning) as caught:
        assert cli_main(args) == 0
    said = [str(w.message) for w in caught]
    assert "k1: knee side R inferred from the shape of the proximal tibia" in said and \
        "k2: knee side R inferred from the shape of the proximal tibia" in said
    status = out / "batch_status_0of1.json"
    assert [s["status"] for s in json.loads(status.read_text())] == ["ok"] * 3
    # k2's CT is replaced and the rerun is stopped there: the status says where it stopped, not the last run's 'ok'
    (out / "k2" / "summary.json").write_text(json.dumps({"request": {"ct": "another"}}))
    behaviour.update(k2="stop")
    assert cli_main(args) == 130
    assert [s["status"] for s in json.loads(status.read_text())] == ["done earlier", "not run", "not run"]
    # a failure where an earlier run's results stay says that they are not this CT's
    behaviour.update(k2="fail")
    assert cli_main(args) == 1
    k2 = json.loads(status.read_text())[1]
    assert k2["status"] == "failed" and "still holds an earlier run's results" in k2["message"]


def test_a_batch_status_names_the_knees_given_no_oa_probability_and_why(knee, constant_student, tmp_path,
                                                                        monkeypatch):
    """A knee of the batch whose diagnosis model gave no probability (an ROI without patches) is analysed ('ok', its
    maps and tables stand), and its row of the status file says why, as 'diagnose predict' does in its message
    column; the batch goes on."""
    from ctsma.inference import batch

    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["k1", "k2"], "ct": [str(knee["ct"])] * 2}).to_csv(manifest, index=False)
    monkeypatch.setattr(batch, "infer", _fake_infer({"k1": "incomplete"}))
    assert cli_main(["--quiet", "infer", str(manifest), "--out", str(tmp_path / "out"), "--model",
                     str(constant_student)]) == 0
    k1, k2 = json.loads((tmp_path / "out" / "batch_status_0of1.json").read_text())
    assert k1["status"] == k2["status"] == "ok" and k2["message"] == ""
    assert k1["message"].startswith("no OA probability: ROI(s) MFC have no valid patch")


def test_a_diagnosis_model_retrained_after_an_upgrade_redoes_the_knees_of_the_previous_version(constant_student,
                                                                                               tmp_path, monkeypatch):
    """The previous version stamped the diagnosis model by its size and modification time. Its records were then
    compared without that stamp (this version stamps the model's bytes instead), so a diagnosis model retrained at
    the same path after the upgrade left every knee the previous version had finished 'done earlier', with the old
    model's OA probability. The old stamp is now compared with the model file as it is: an unchanged model still
    redoes nothing."""
    from ctsma import diagnosis as dg
    from ctsma.diagnosis.synthetic import synthetic_cohort
    from ctsma.inference import batch
    from ctsma.io.atomic import input_stamp

    table, labels = synthetic_cohort(12, 3, seed=4)
    dx = tmp_path / "dx.safetensors"
    dg.save(dg.train(table, labels, "logistic", folds=None), dx)
    ct = tmp_path / "k1.nii.gz"
    ct.write_bytes(b"ct")  # the stand-in for infer reads nothing
    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": ["k1"], "ct": [str(ct)]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    monkeypatch.setattr(batch, "infer", _fake_infer({}))

    def status():
        assert cli_main(["--quiet", "infer", str(manifest), "--out", str(out), "--model", str(constant_student),
                         "--diagnosis-model", str(dx)]) == 0
        return json.loads((out / "batch_status_0of1.json").read_text())[0]

    assert status()["status"] == "ok"
    summary = json.loads((out / "k1" / "summary.json").read_text())  # as the previous version recorded it
    stamps = {k: v for k, v in summary["request"]["stamps"].items() if not k.endswith("_sha256")}
    summary["request"]["stamps"] = {**stamps, "diagnosis_model": input_stamp(dx)}
    (out / "k1" / "summary.json").write_text(json.dumps(summary))
    assert status()["status"] == "done earlier"  # the upgrade itself redoes nothing
    before = dx.stat()
    dg.save(dg.train(table, labels.assign(oa=1 - labels["oa"]), "logistic", folds=None), dx)  # retrained in place
    os.utime(dx, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    again = status()
    assert again["status"] == "ok" and "redone" in again["message"], again


def test_a_batch_split_into_other_shards_removes_the_status_files_of_the_earlier_split(constant_student, tmp_path,
                                                                                        monkeypatch, capsys):
    """A batch run with --shard 1/2 and then with --shard 1/3 into one folder left batch_status_1of2.json beside
    batch_status_1of3.json, and no one could tell which was current. The shards of one split (a job array, run at
    the same time) keep each other's files, and a file that only looks like a status file is not touched."""
    from ctsma.inference import batch

    cts = []
    for k in range(4):
        cts.append(tmp_path / f"k{k}.nii.gz")
        cts[-1].write_bytes(b"ct")  # the stand-in for infer reads nothing
    manifest = tmp_path / "cts.csv"
    pd.DataFrame({"subject": [f"k{k}" for k in range(4)], "ct": [str(c) for c in cts]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    monkeypatch.setattr(batch, "infer", _fake_infer({}))

    def shard(i_n):
        assert cli_main(["infer", str(manifest), "--out", str(out), "--model", str(constant_student),
                         "--shard", i_n]) == 0
        return {p.name for p in out.glob("batch_status_*")}

    assert shard("0/2") == {"batch_status_0of2.json"}
    assert shard("1/2") == {"batch_status_0of2.json", "batch_status_1of2.json"}   # one split: both kept
    (out / "batch_status_of_ward3.json").write_text("{}")  # a user's file, not a status file
    capsys.readouterr()
    assert shard("1/3") == {"batch_status_1of3.json", "batch_status_of_ward3.json"}
    assert "batch_status_0of2.json, batch_status_1of2.json" in capsys.readouterr().err  # said, not silent
    assert [s["status"] for s in json.loads((out / "batch_status_1of3.json").read_text())] == ["done earlier"]
    assert shard("0/3") | shard("2/3") == {f"batch_status_{i}of3.json" for i in range(3)} | {
        "batch_status_of_ward3.json"}
    assert shard("0/1") == {"batch_status_0of1.json", "batch_status_of_ward3.json"}  # no --shard: one shard of 1
    assert [s["status"] for s in json.loads((out / "batch_status_0of1.json").read_text())] == ["done earlier"] * 4


def test_a_batch_keeps_the_warnings_that_filters_ignore_silenced(monkeypatch):
    """Each case's warnings are said again with the subject in front: a filter that ignores a warning by its text
    (matched from the start) or its module no longer matched the prefixed text, so a warning that a user or a
    library had silenced was shown for every knee of a batch (and only there)."""
    import warnings

    from ctsma.inference.batch import _warnings_named

    def case():
        warnings.warn("a noisy library note", UserWarning)
        warnings.warn("knee side R inferred", UserWarning)

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message="a noisy library note")
        with _warnings_named("k1"):
            case()
    assert [str(w.message) for w in said] == ["k1: knee side R inferred"]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=UserWarning, module=__name__)
        with _warnings_named("k1"):
            case()
    assert said == []


def test_a_ct_given_as_the_current_folder_is_named_after_it(tmp_path, monkeypatch):
    """`ctsma infer . --out ../result` inside a DICOM folder wrote an empty subject to summary.json and patches.csv,
    and `ctsma report patient` then refused to name the report ('subject ID '' has no letters or digits')."""
    from ctsma.io.images import subject_from_path as _subject_name

    (tmp_path / "knee 7" / "dicom").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "knee 7" / "dicom")
    assert _subject_name(".") == "dicom" and _subject_name("..") == "knee 7"
    assert _subject_name("./") == "dicom" and _subject_name(tmp_path / "P01.nii.gz") == "P01"


def test_a_ct_named_for_what_it_is_is_named_after_its_folder(tmp_path):
    """The phantom and the contract write P0001/ct.nii.gz: its knee was called 'ct' in the outputs and report, and a
    batch manifest of such paths without a subject column was refused as duplicate subjects ('ct', 'ct', ...)."""
    from ctsma.inference.batch import list_cases
    from ctsma.io.images import subject_from_path

    assert subject_from_path(tmp_path / "P0001" / "ct.nii.gz") == "P0001"
    assert subject_from_path(tmp_path / "knee 7" / "CT.NRRD") == "knee 7"
    assert subject_from_path(tmp_path / "P0001" / "ct_left.nii.gz") == "ct_left"
    assert subject_from_path(tmp_path / "P0001" / "CT") == "P0001"  # a DICOM folder called CT
    (tmp_path / "m.csv").write_text("ct\nP0001/ct.nii.gz\nP0002/ct.nii.gz\n", encoding="utf-8")
    assert list(list_cases(tmp_path / "m.csv").subject) == ["P0001", "P0002"]


def test_infer_refuses_to_write_into_the_cts_dicom_folder(tmp_path, capsys):
    """`ctsma infer DICOM --out DICOM` wrote the label images and maps among the slices; the same command again
    then took the folder for a batch of CTs and failed on bones.nii.gz and rois.nii.gz as CTs."""
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    (dicom / "s000.dcm").write_bytes(b"slice")
    assert cli_main(["infer", str(dicom), "--out", str(tmp_path / "." / "dicom")]) == 2
    assert "is the CT's DICOM folder" in capsys.readouterr().err
    assert [p.name for p in dicom.iterdir()] == ["s000.dcm"]


def test_summary_records_its_inputs_as_absolute_paths(knee, constant_student, tmp_path, monkeypatch):
    """`ctsma infer ct.nii.gz --model ../m.safetensors` recorded 'ct.nii.gz' and '../m.safetensors' in
    summary.json, which name no file from another folder (the patient report showed them so)."""
    import json
    import shutil

    from ctsma.inference.engine import default_diagnosis_path

    shutil.copy(constant_student, tmp_path / "m.safetensors")
    monkeypatch.chdir(Path(knee["ct"]).parent)
    rel_model = os.path.relpath(tmp_path / "m.safetensors")
    assert _run(Path(knee["ct"]).name, "--segmentation", Path(knee["ct_bones"]).name, "--model", rel_model,
                "--out", tmp_path / "o") == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["ct"] == os.path.abspath(knee["ct"])
    assert summary["model"]["path"] == os.path.abspath(tmp_path / "m.safetensors")
    assert summary["diagnosis"]["model"] == os.path.abspath(default_diagnosis_path())  # its links kept


def test_a_segmentation_of_another_knee_or_mirrored_is_warned(knee, constant_student, tmp_path):
    """A user's bone segmentation that does not outline this CT's bones (mirrored left-right here; another knee's
    alike) was analysed without a word, down to an OA probability. Its own segmentation passes silently."""
    args = ("--model", constant_student, "--side", knee["side"])
    assert _run(knee["ct"], "--out", tmp_path / "own", "--segmentation", knee["bones_only"], *args) == 0
    said = json.loads((tmp_path / "own" / "summary.json").read_text())["warnings"]
    assert not [w for w in said if "may not match this CT's femur and tibia" in w], said
    lab = sitk.ReadImage(str(knee["bones_only"]))
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(lab)[:, :, ::-1])
    mirrored.CopyInformation(lab)
    sitk.WriteImage(mirrored, str(tmp_path / "mirrored.nii.gz"))
    assert _run(knee["ct"], "--out", tmp_path / "mir", "--segmentation", tmp_path / "mirrored.nii.gz", *args) == 0
    said = json.loads((tmp_path / "mir" / "summary.json").read_text())["warnings"]  # analysed, the warning on record
    assert [w for w in said if w.startswith("the bone segmentation may not match this CT's femur and tibia")], said


def test_a_segmentation_drawn_inside_the_bone_edge_is_not_called_another_knees(knee):
    """The bright-shell rule cannot tell this knee's own bones drawn 1 mm inside their outer edge (the cortex then
    lies in the shell: 15-17 % of it bone-bright on the phantom, over the 10 % limit) from a mirrored segmentation
    (11-35 %); the warning named only another knee's or a mirrored segmentation as the cause."""
    from scipy import ndimage as ndi

    from ctsma.inference.engine import InferSettings, _coarse_copy, _to_grid
    from ctsma.segmentation.labelio import bone_labels_mismatch

    ct, lab = sitk.ReadImage(str(knee["ct"])), sitk.ReadImage(str(knee["bones_only"]))
    a = sitk.GetArrayFromImage(lab)
    inner = np.zeros_like(a)
    for v in (1, 2, 3, 4):  # each bone 1 mm inside its edge
        inner[ndi.distance_transform_edt(a == v, sampling=ct.GetSpacing()[::-1]) > 1.0] = v
    eroded = sitk.GetImageFromArray(inner)
    eroded.CopyInformation(lab)
    seg_ct = _coarse_copy(ct, InferSettings().segmentation_spacing_mm)
    assert bone_labels_mismatch(seg_ct, _to_grid(lab, seg_ct)) is None
    said = bone_labels_mismatch(seg_ct, _to_grid(eroded, seg_ct))
    assert said is not None and "or one drawn inside the bone's outer edge" in said, said
