"""User mistakes found by an adversarial audit of the command line (twentieth session): each gives one clear line
and exit code 2 (or excludes the one subject, with the reason), never a traceback, and leaves no output folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from ctsma.cli.main import main as cli_main
from ctsma.errors import ConfigError, ModelFileError, UserError

MODELS = Path(__file__).resolve().parent.parent / "Resources" / "Models"
CONFIGS = MODELS.parent / "Configs"


def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(["--quiet", *map(str, args)])
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture()
def ct_crop(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray((rng.random((12, 14, 16)) * 1500 - 200).astype(np.float32))
    img.SetSpacing((0.3, 0.3, 0.3))
    path = tmp_path / "crop.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("option, message", [
    (["--smooth-sigma=inf"], "--smooth-sigma must be"),
    (["--smooth-sigma=1e9"], "--smooth-sigma must be"),
    (["--smooth-sigma=nan"], "--smooth-sigma must be"),
    (["--method", "local", "--window-mm=1e9"], "--window-mm must be"),
    (["--method", "local", "--window-mm=nan"], "--window-mm must be"),
    (["--threads=100000"], "--threads must be between"),
])
def test_morphometry_options_out_of_range(capsys, tmp_path, ct_crop, option, message):
    out = tmp_path / "m"
    rc, err = _cli(capsys, "morphometry", ct_crop, "--modality", "ct", *option, "--out", out)
    assert rc == 2 and message in err and "Traceback" not in err and not out.exists()


def test_otsu_on_values_a_few_float_steps_apart_is_a_clear_error():
    from ctsma.morphometry import binarise
    from ctsma.morphometry.validate import MorphometryError

    arr = np.full((6, 6, 6), 762.128, np.float32)
    arr[0, 0, 0] = np.nextafter(np.float32(762.128), np.float32(800))
    with pytest.raises(MorphometryError, match="too small a range to threshold"):
        binarise(arr, (1.0, 1.0, 1.0), None, modality="ct")


def test_infer_manifest_with_an_empty_ct_cell_and_a_nan_stride(capsys, tmp_path, ct_crop):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"subject": ["a", "b"], "ct": [str(ct_crop), None]}).to_csv(manifest, index=False)
    rc, err = _cli(capsys, "infer", manifest, "--out", tmp_path / "o")
    assert rc == 2 and "'ct' cell is empty in rows [3]" in err and not (tmp_path / "o").exists()
    rc, err = _cli(capsys, "infer", ct_crop, "--stride", "nan", "--out", tmp_path / "o")
    assert rc == 2 and "--stride must be" in err


def test_progress_file_that_cannot_be_written_is_refused_up_front(capsys, tmp_path, ct_crop):
    for bad, message in ((tmp_path, "is a folder"), (tmp_path / "nope" / "p.jsonl", "does not exist")):
        rc, err = _cli(capsys, "--progress-jsonl", bad, "morphometry", ct_crop, "--modality", "ct",
                       "--out", tmp_path / "o")
        assert rc == 2 and message in err and not (tmp_path / "o").exists()


def test_an_empty_out_is_refused_whatever_the_option_s_type(capsys, tmp_path, ct_crop, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it would have written here
    for args in (["infer", ct_crop, "--out", ""], ["morphometry", ct_crop, "--modality", "ct", "--out="]):
        rc, err = _cli(capsys, *args)
        assert rc == 2 and "--out is empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.nii.gz"]


def test_an_empty_path_option_is_refused_before_any_work(capsys, tmp_path, ct_crop):
    """An unset shell variable: 'train --store ""' trained on the config's store, 'morphometry --mask ""' measured
    the whole image; every option naming a file or folder is refused empty, in one line."""
    cases = (["train", "teacher", "--config", CONFIGS / "demo.yaml", "--store", "", "--out", tmp_path / "run"],
             ["evaluate", "--config", CONFIGS / "demo.yaml", "--models=", "--out", tmp_path / "ev"],
             ["morphometry", ct_crop, "--modality", "ct", "--mask", " ", "--out", tmp_path / "m"],
             ["infer", ct_crop, "--model", "", "--out", tmp_path / "i"])
    for args in cases:
        rc, err = _cli(capsys, *args)
        flag = next(a.partition("=")[0] for a, b in zip(map(str, args), list(map(str, args[1:])) + ["x"])
                    if a.startswith("--") and (a.endswith("=") or not b.strip()))
        assert rc == 2 and f"{flag} is empty (an unset variable?)" in err, (args, err)
    assert not any(tmp_path.glob("run*")) and not (tmp_path / "m").exists() and not (tmp_path / "i").exists()


def test_train_set_value_that_is_not_yaml(capsys, tmp_path):
    rc, err = _cli(capsys, "train", "teacher", "--config", CONFIGS / "demo.yaml", "--store", tmp_path,
                   "--set", "distill.stages=[stage1",
                   "--out", tmp_path / "run")
    assert rc == 2 and "is not a YAML value" in err and "a list is written [a, b]" in err


def test_diagnose_seed_out_of_range_and_a_table_without_rows(capsys, tmp_path):
    table = tmp_path / "p.csv"
    table.write_text("subject,roi,p_BV/TV,p_Tb.Th,p_Tb.Sp,p_Tb.N\n")
    rc, err = _cli(capsys, "diagnose", "evaluate", "--patches", table, "--labels", table, "--prefix", "p_",
                   "--seed=-1", "--out", tmp_path / "dx")
    assert rc == 2 and "--seed must be between 0 and 2**32 - 1" in err and not (tmp_path / "dx").exists()
    rc, err = _cli(capsys, "diagnose", "predict", "--model", MODELS / "diagnosis_demo.safetensors",
                   "--patches", table, "--prefix", "p_")
    assert rc == 2 and "patch table p.csv has no rows" in err


def test_registration_presets_whose_settings_do_not_fit_together():
    from ctsma.registration.presets import load_preset

    with pytest.raises(ConfigError, match=r"rigid.shrink \(3 levels\) and rigid.smooth_mm \(2 levels\)"):
        load_preset(None, {"rigid": {"shrink": [4, 2, 1], "smooth_mm": [1.0, 0.0]}})
    with pytest.raises(ConfigError, match=r"unknown bone\(s\) \['humerus'\]"):
        load_preset(None, {"per_bone": {"bones": ["femur", "humerus"]}})
    assert load_preset("default").per_bone.bones == ["femur", "tibia"]


def test_subchondral_roi_depths_go_through_the_settings_checks():
    from ctsma.segmentation import subchondral_rois

    img = sitk.Image(8, 8, 8, sitk.sitkInt16)
    with pytest.raises(ConfigError, match="end_mm must be finite"):
        subchondral_rois(img, sitk.Image(8, 8, 8, sitk.sitkUInt8), end_mm=float("inf"))
    with pytest.raises(ConfigError, match=r"out of range \[0.5, 40.0\]"):
        subchondral_rois(img, sitk.Image(8, 8, 8, sitk.sitkUInt8), end_mm=1e9)


def test_dataset_build_excludes_a_subject_with_a_foreign_qa_record_or_a_damaged_transform(tmp_path):
    from ctsma.dataset.build import BuildSettings, SubjectExcluded, load_transform

    reg = tmp_path / "reg" / "P0000"
    reg.mkdir(parents=True)
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), str(reg / "transform_ct_to_mr.h5"))
    for qa in ({"bone_dice": 0.9}, [1, 2], {"stages": "rigid"}):
        (reg / "qa.json").write_text(json.dumps(qa))
        with pytest.raises(SubjectExcluded, match="is not a QA record of 'ctsma register'"):
            load_transform({"subject": "P0000"}, tmp_path, BuildSettings(), tmp_path / "reg")
    (reg / "qa.json").write_text(json.dumps({"bone_dice": {"femur": 0.95, "tibia": 0.93}}))
    tx, source = load_transform({"subject": "P0000"}, tmp_path, BuildSettings(), tmp_path / "reg")
    assert tx.TransformPoint((2.0, 3.0, 4.0)) == pytest.approx((3.0, 3.0, 4.0))  # the file's translation, read back
    assert source == f"registered ({reg})"
    (reg / "transform_ct_to_mr.h5").write_text("subject,roi\n")
    with pytest.raises(SubjectExcluded, match="not an ITK transform file"):
        load_transform({"subject": "P0000"}, tmp_path, BuildSettings(), tmp_path / "reg")


def test_dataset_build_names_an_empty_transform_cell_as_empty(tmp_path):
    """An empty cell of --transform-column excluded its knee with 'no transform file in column ... (None)'."""
    from ctsma.dataset.build import BuildSettings, SubjectExcluded, load_transform

    s = BuildSettings(transform_column="transform_ct_to_mr")
    for cell in ("", "  ", None):
        with pytest.raises(SubjectExcluded, match="column 'transform_ct_to_mr' is empty for this knee") as err:
            load_transform({"subject": "P0000", "transform_ct_to_mr": cell}, tmp_path, s, None)
        assert "None" not in str(err.value)
    with pytest.raises(SubjectExcluded, match="no transform file in column 'transform_ct_to_mr' "):
        load_transform({"subject": "P0000", "transform_ct_to_mr": "t.h5"}, tmp_path, s, None)


def test_a_damaged_store_and_a_damaged_checkpoint_are_clear_errors(tmp_path):
    from ctsma.dataset.store import PatchStore, PatchStoreError
    from ctsma.dataset.synthetic import make_synthetic_store
    from ctsma.models.networks import PatchRegressor
    from ctsma.models.train import _check_resumable

    store = make_synthetic_store(tmp_path / "store", n_subjects=3, patches_per_subject=2)
    h5 = store.dir / "patches.h5"
    h5.write_bytes(h5.read_bytes()[:1000])
    with pytest.raises(PatchStoreError, match="damaged or not an HDF5 file|cannot be read"):
        PatchStore(store.dir).read("ct", np.arange(6))
    other = tmp_path / "other"
    other.mkdir()
    (other / "patches.csv").write_bytes((store.dir / "patches.csv").read_bytes())
    (other / "patches.h5").write_bytes(b"not hdf5")
    with pytest.raises(PatchStoreError, match="damaged or not an HDF5 file"):
        PatchStore(other)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:20])
    with pytest.raises(ModelFileError, match="is damaged"):
        _check_resumable(ckpt, PatchRegressor(1, 16, widths=(4, 8, 8, 8), head_hidden=8))


def test_evaluate_refuses_a_model_file_under_another_role_s_name(tmp_path):
    """A teacher copied over the distilled student's file would be scored and reported as the student."""
    import shutil

    from ctsma.dataset.synthetic import make_synthetic_store
    from ctsma.evaluation.regression import predict_sources
    from ctsma.models import load_train_config
    from ctsma.models.export import build_meta, export_model
    from ctsma.models.networks import PatchRegressor

    store = make_synthetic_store(tmp_path / "store", n_subjects=4, patches_per_subject=3)
    run = tmp_path / "run"
    run.mkdir()
    net = PatchRegressor(1, store.mr_shape[0], widths=(4, 8, 8, 8), head_hidden=8)
    meta = build_meta("teacher", net, modality="mr", spacing_mm=0.25, extent_mm=8.0, masks=False, intensity_offset=0,
                      intensity_scale=1, target="mr", y_mean=np.zeros(4), y_sd=np.ones(4), training={}, metrics={})
    export_model(run / "teacher.safetensors", net, meta)
    cfg = load_train_config(CONFIGS / "demo.yaml", {"data": {"store": str(store.dir)}, "output": {"dir": str(run)}})
    preds, _ = predict_sources(cfg, store, np.arange(3))
    assert set(preds) == {"teacher"}
    shutil.copy(run / "teacher.safetensors", run / "student_distilled.safetensors")
    with pytest.raises(UserError, match="holds a 'teacher' model, not the student_distilled"):
        predict_sources(cfg, store, np.arange(3))
    # a diagnosis model under the teacher's name is named for what it is
    (run / "student_distilled.safetensors").unlink()
    shutil.copy(Path(__file__).resolve().parents[1] / "Resources" / "Models" / "diagnosis_demo.safetensors",
                run / "teacher.safetensors")
    with pytest.raises(ModelFileError, match="is a 'diagnosis' model, not a teacher or student"):
        predict_sources(cfg, store, np.arange(3))
    # and a synthesis training preset that does not exist lists those that do
    from ctsma.synthesis.training import load_train_config as synthesis_config

    with pytest.raises(ConfigError, match="unknown synthesis training preset 'bogus' \\(shipped: default, demo"):
        synthesis_config("bogus")


# --- options that other settings make meaningless are refused, not silently ignored (twenty-first session) ---

@pytest.mark.parametrize("option, message", [
    (["--threshold", "0.5"], "--threshold applies to binarising a grey-level image"),
    (["--n4", "--smooth-sigma", "1"], "--n4, --smooth-sigma apply to binarising a grey-level image"),
    (["--method", "local"], "--method local applies to binarising a grey-level image"),
])
def test_morphometry_grey_level_options_on_a_binary_image(capsys, tmp_path, ct_crop, option, message):
    out = tmp_path / "m"
    rc, err = _cli(capsys, "morphometry", ct_crop, *option, "--out", out)
    assert rc == 2 and message in err and "--modality ct" in err and not out.exists()


@pytest.mark.parametrize("option, message", [
    (["--modality", "ct", "--window-mm", "4"], "--window-mm belongs to --method local"),
    (["--modality", "ct", "--offset", "0.1"], "--offset belongs to --method local"),
    (["--modality", "ct", "--label", "2"], "--label picks a label of the ROI mask: give --mask"),
    (["--modality", "ct", "--stride", "2"], "--stride is the step of the sliding-window maps"),
])
def test_morphometry_options_of_another_method(capsys, tmp_path, ct_crop, option, message):
    out = tmp_path / "m"
    rc, err = _cli(capsys, "morphometry", ct_crop, *option, "--out", out)
    assert rc == 2 and message in err and not out.exists()


@pytest.mark.parametrize("offset", ["nan", "inf"])
def test_morphometry_local_offset_must_be_finite(capsys, tmp_path, ct_crop, offset):
    """A NaN offset made every voxel marrow: BV/TV 0 without a word (a NaN comparison is always false)."""
    from ctsma.morphometry import binarise

    out = tmp_path / "m"
    rc, err = _cli(capsys, "morphometry", ct_crop, "--modality", "mr", "--method", "local", "--offset", offset,
                   "--out", out)
    assert rc == 2 and "--offset must be a finite fraction of the local mean" in err and not out.exists()
    with pytest.raises(UserError, match="offset must be a finite fraction"):
        binarise(np.ones((8, 8, 8)) + np.eye(8)[None], (1, 1, 1), modality="mr", method="local",
                 offset=float(offset))


def test_register_options_of_the_other_mode(capsys, tmp_path, ct_crop):
    out = tmp_path / "r"
    for option in (["--shard", "0/2"], ["--limit", "3"], ["--jobs", "2"]):
        rc, err = _cli(capsys, "register", ct_crop, ct_crop, "--preset", "nosynth", *option, "--out", out)
        assert rc == 2 and f"{option[0]} apply to cohort mode only" in err and not out.exists()
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"subject,mr,ct\nk1,{ct_crop},{ct_crop}\n")
    rc, err = _cli(capsys, "register", "--manifest", manifest, "--preset", "nosynth", "--ct-bones", ct_crop,
                   "--out", out)
    assert rc == 2 and "--ct-bones apply to one pair" in err and "ct_bones / mr_bones columns" in err
    assert not out.exists()


def test_dataset_manifest_side_that_is_not_left_or_right(tmp_path):
    from ctsma.dataset.build import read_manifest

    path = tmp_path / "m.csv"
    path.write_text("subject,ct,mr,side\nk1,a.nii,b.nii,left\nk2,a.nii,b.nii,\nk3,a.nii,b.nii,X\n")
    with pytest.raises(UserError, match="side 'X' of subject k3 is not L or R"):
        read_manifest(path)
    path.write_text("subject,ct,mr,side\nk1,a.nii,b.nii,left\nk2,a.nii,b.nii,\nk3,a.nii,b.nii, R\n")
    assert list(read_manifest(path)["subject"]) == ["k1", "k2", "k3"]


def test_an_empty_config_file_warns_that_every_setting_is_a_default(tmp_path):
    from ctsma.config import load_config
    from ctsma.demo.settings import DemoSettings

    path = tmp_path / "demo.yaml"
    path.write_text("# every line a comment\n")
    with pytest.warns(UserWarning, match="holds no settings"):
        cfg = load_config(path, DemoSettings)
    assert cfg == DemoSettings()


def test_register_refuses_bone_labels_that_are_not_integers(capsys, tmp_path, ct_crop):
    ct = sitk.ReadImage(str(ct_crop))
    soft = sitk.GetImageFromArray(np.random.default_rng(1).random(ct.GetSize()[::-1]).astype(np.float32) * 2)
    soft.CopyInformation(ct)  # a probability map: truncated to labels it would move every bone edge
    path = tmp_path / "bones.nii.gz"
    sitk.WriteImage(soft, str(path))
    out = tmp_path / "r"
    rc, err = _cli(capsys, "register", ct_crop, ct_crop, "--preset", "nosynth", "--ct-bones", path, "--out", out)
    assert rc == 2 and "is not a label image (it has non-integer values)" in err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["segment", "missing_ct.nii.gz", "--end-mm", "-3"], "--end-mm -3.0 is out of range [0.5, 40.0]"),
    (["segment", "missing_ct.nii.gz", "--end-mm", "inf"], "--end-mm must be finite"),
    (["segment", "missing_ct.nii.gz", "--start-mm", "7"], "--start-mm must be below --end-mm (got 7.0 and 6.0)"),
    (["segment", "missing_ct.nii.gz", "--threshold-hu", "nan"], "--threshold-hu must be finite"),
    (["demo", "--n", "3"], "--n 3 is out of range [8, 10000]"),
    (["register", "missing_mr.nii.gz", "missing_ct.nii.gz", "--preset", "nosynth", "--threads", "-2"],
     "--threads -2 is out of range"),
    (["dataset", "build", "--manifest", "missing.csv", "--stride-mm", "-1"], "--stride-mm -1.0 is out of range"),
])
def test_option_errors_name_the_option_and_come_before_any_work(capsys, tmp_path, argv, message):
    """A value given by an option is checked before the images are read (they do not exist here), and the error
    names the option typed, not the config key behind it."""
    out = tmp_path / "o"
    rc, err = _cli(capsys, *argv, "--out", out)
    assert rc == 2 and message in err and "_mm" not in err and not out.exists()


def test_a_config_file_value_keeps_its_key_in_the_error(capsys, tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("n: 3\n")
    rc, err = _cli(capsys, "demo", "--config", cfg, "--out", tmp_path / "o")
    assert rc == 2 and "n = 3 is out of range" in err and "--n" not in err


def test_zero_limits_a_foreign_metrics_file_and_a_foreign_manifest_are_refused(capsys, tmp_path):
    """0 is no 'no limit': `synthesis train --limit 0` and `--max-minutes 0` are refused before any work; a JSON
    file with none of the study report's blocks is not a metrics file; a phantom run never overwrites a
    manifest.csv that it did not write."""
    (tmp_path / "m.csv").write_text("subject,mr,ct\nk,mr.nii.gz,ct.nii.gz\n")
    for opt in (["--limit", "0"], ["--max-minutes", "0"]):
        assert cli_main(["--quiet", "synthesis", "train", "--manifest", str(tmp_path / "m.csv"), *opt,
                         "--out", str(tmp_path / "s.safetensors")]) == 2
        assert opt[0] in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"oa_probability": 0.3, "roi_table": []}))
    assert cli_main(["--quiet", "report", "study", str(tmp_path / "run")]) == 2
    assert "none of the blocks" in capsys.readouterr().err and not (tmp_path / "run" / "report").exists()
    own = tmp_path / "mine"
    own.mkdir()
    (own / "manifest.csv").write_text("subject,ct\nmy_knee,ct.nii.gz\n")
    assert cli_main(["--quiet", "phantom", "--n", "1", "--out", str(own)]) == 2
    assert "no phantom run wrote" in capsys.readouterr().err
    assert (own / "manifest.csv").read_text() == "subject,ct\nmy_knee,ct.nii.gz\n"


def test_a_split_with_one_test_patient_is_flagged_at_training_and_refused_with_a_working_fix(tmp_path):
    """A small store's stored split can hold a single test patient: training warns at once (it needs none, its
    evaluation will), evaluation refuses, and the fix its message names (patient folds) does work."""
    from ctsma.dataset.synthetic import make_synthetic_store
    from ctsma.evaluation.regression import evaluate
    from ctsma.models import load_train_config
    from ctsma.models.lightning import PatchDataModule

    store = make_synthetic_store(tmp_path / "store", n_subjects=6, patches_per_subject=3)
    over = {"data": {"store": str(store.dir), "use_stored_split": False, "test_fraction": 0.1},
            "output": {"dir": str(tmp_path / "run")}}
    cfg = load_train_config(CONFIGS / "demo.yaml", over)
    with pytest.warns(UserWarning, match="holds 1 test patient.*'ctsma evaluate' will need at least 2"):
        PatchDataModule(store, cfg.data, seed=0)
    with pytest.raises(UserError, match="holds 1 test patient.*evaluation needs at least 2: .*data.k_folds"):
        evaluate(cfg, tmp_path / "eval", store=store)
    folds = load_train_config(CONFIGS / "demo.yaml", {**over, "data": {**over["data"], "use_stored_split": True,
                                                                      "k_folds": 3, "fold": 1}})
    assert len(PatchDataModule(store, folds.data, seed=0).split.subjects["test"]) == 2


def test_few_patients_or_knees_make_rough_intervals_and_say_so(tmp_path, capsys):
    """A patient bootstrap over a handful of patients, or an AUC over a handful of knees, gives intervals that look
    precise and are not: evaluation and diagnosis evaluation say so."""
    from ctsma.dataset.synthetic import make_synthetic_store
    from ctsma.diagnosis.synthetic import synthetic_cohort
    from ctsma.evaluation.regression import evaluate
    from ctsma.models import load_train_config

    store = make_synthetic_store(tmp_path / "store", n_subjects=8, patches_per_subject=3)
    cfg = load_train_config(CONFIGS / "demo.yaml", {"data": {"store": str(store.dir), "k_folds": 4, "fold": 0},
                                                    "output": {"dir": str(tmp_path / "none")}})
    with pytest.warns(UserWarning, match="only 2 held-out patients: the confidence intervals"):
        with pytest.raises(UserError, match="no trained models"):  # warned before it looks for models
            evaluate(cfg, tmp_path / "eval", store=store)
    table, labels = synthetic_cohort(12, 3, seed=1)
    table.to_csv(tmp_path / "p.csv", index=False)
    labels.to_csv(tmp_path / "l.csv", index=False)
    with pytest.warns(UserWarning, match="only 12 labelled knees: AUCs and their CIs from so few are rough"):
        rc, _ = _cli(capsys, "diagnose", "evaluate", "--patches", tmp_path / "p.csv", "--labels", tmp_path / "l.csv",
                     "--aggregators", "logistic", "--folds", "3", "--out", tmp_path / "dx")
    assert rc == 0


def test_a_manifest_given_as_its_folder_says_so(capsys, tmp_path):
    """``--manifest`` of a folder (the cohort's, not its CSV) said "manifest not found", though the path exists."""
    for cmd in (["register", "--manifest", tmp_path, "--preset", "nosynth", "--out", tmp_path / "r"],
                ["dataset", "build", "--manifest", tmp_path, "--out", tmp_path / "d"]):
        rc, err = _cli(capsys, *cmd)
        assert rc == 2 and f"manifest {tmp_path} is a folder; give the file itself" in err, err
    rc, err = _cli(capsys, "register", "--manifest", tmp_path / "none.csv", "--preset", "nosynth", "--out",
                   tmp_path / "r")
    assert rc == 2 and f"manifest not found: {tmp_path / 'none.csv'}" in err, err
