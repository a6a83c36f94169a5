"""Both modules' Logic on a phantom knee, headless, with the ``ctsma`` process swapped for scripts that
write the phantom's TRUE answers in the contract's files. What is tested is the Slicer side: the
transform node's direction and interpolation (checked against the phantom's landmarks), the fade and
checkerboard views, the analysis outputs (geometry, colours, 4x4 table, named segments), the
subject-hierarchy grouping and a .mrb round trip.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctsma import PARAMETERS, ROIS
from ctsma.jit import TINY_KNEE as TINY  # a phantom knee that builds in a few seconds

from CTSMALib.process import DONE, ProcessRunner

pytestmark = pytest.mark.mrml



@pytest.fixture(scope="module")
def knee(tmp_path_factory):
    """One tiny phantom knee: its manifest row with absolute paths."""
    from ctsma.phantom.cohort import generate_cohort
    from ctsma.phantom.settings import make_settings

    out = tmp_path_factory.mktemp("knee")
    manifest = generate_cohort(make_settings("demo", TINY), 1, 4, out)
    row = pd.read_csv(manifest).iloc[0].to_dict()
    for key in ("ct", "mr", "ct_bones", "ct_rois", "transform_ct_to_mr", "landmarks"):
        row[key] = out / row[key]
    return row


class _Script(ProcessRunner):
    """Runs ``BODY`` with the phantom's row (JSON) and the real ctsma argument list."""

    BODY = ""
    row: dict = {}

    def start_ctsma(self, args, work_dir, env=None, python=None, wrapper=None):
        self.args = list(args)
        row = json.dumps({k: str(v) for k, v in self.row.items()})
        cmd = [sys.executable, "-c", textwrap.dedent(self.BODY), row, *map(str, args)]
        return self.start(cmd, work_dir, Path(work_dir) / "progress.jsonl", env=env)


class TrueRegistration(_Script):
    """``ctsma register``: the phantom's true CT->MR transform, the MR resampled with it, a QA file."""

    BODY = """
    import json, os, shutil, sys
    import SimpleITK as sitk
    row, args = json.loads(sys.argv[1]), sys.argv[2:]
    out = args[args.index("--out") + 1]; os.makedirs(out)
    shutil.copy(row["transform_ct_to_mr"], os.path.join(out, "transform_ct_to_mr.h5"))
    tx = sitk.ReadTransform(row["transform_ct_to_mr"])
    ct, mr = sitk.ReadImage(args[2]), sitk.ReadImage(args[1])
    sitk.WriteImage(sitk.Resample(mr, ct, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32), os.path.join(out, "mr_in_ct.nii.gz"))
    json.dump({"stages": [{"name": "truth", "metric_before": None, "metric_after": None, "kept": True,
                           "bone_dice": 1.0, "seconds": 0.1}], "total_seconds": 0.1},
              open(os.path.join(out, "qa.json"), "w"))
    """


class TrueAnalysis(_Script):
    """``ctsma segment`` / ``ctsma infer``: the phantom's bones and ROIs, maps holding each ROI's true
    value inside it (0 outside), and the 4 ROI x 4 parameter table of those true values."""

    BODY = """
    import json, os, sys
    import numpy as np, SimpleITK as sitk
    row, args = json.loads(sys.argv[1]), sys.argv[2:]
    out = args[args.index("--out") + 1]; os.makedirs(out + "/maps", exist_ok=True)
    ct = sitk.ReadImage(args[1])
    def on_ct(path):
        img = sitk.ReadImage(path); img.SetOrigin(ct.GetOrigin()); return img
    if "--no-rois" in args or args[0] == "infer":  # the phantom's label file also holds tissues >= 10
        bones = on_ct(row["ct_bones"])
        sitk.WriteImage(sitk.Mask(bones, sitk.Less(bones, 10)), out + "/bones.nii.gz")
    if "--bones" in args or args[0] == "infer":
        sitk.WriteImage(on_ct(row["ct_rois"]), out + "/rois.nii.gz")
    if args[0] == "infer":
        rois = sitk.GetArrayFromImage(sitk.ReadImage(row["ct_rois"]))
        names = {"MFC": 1, "LFC": 2, "MTP": 3, "LTP": 4}
        stems = {"BV/TV": "bvtv", "Tb.Th": "tbth", "Tb.Sp": "tbsp", "Tb.N": "tbn"}
        rows = []
        for param, stem in stems.items():
            m = np.zeros(rois.shape, np.float32)
            for roi, value in names.items():
                truth = float(row[f"true_{roi}_{param}"])
                m[rois == value] = truth
                rows.append(f"{roi},{param},{truth},0.0,{truth},0.0,{int((rois == value).sum())}")
            img = sitk.GetImageFromArray(m); img.CopyInformation(ct)
            sitk.WriteImage(img, out + f"/maps/{stem}.nii.gz")
        open(out + "/roi_table.csv", "w").write("roi,parameter,mean,sd,median,iqr,n_patches\\n" + "\\n".join(rows) + "\\n")
        json.dump({"subject": row["subject"], "oa_probability": 0.3, "severity": 0.5, "auc": 0.8},
                  open(out + "/summary.json", "w"))
    """


def _load(scene, path, name):
    from CTSMALib import scene_bridge as sb

    return sb.sitk_to_volume_node(sitk.ReadImage(str(path)), scene, name)


def _patient_study(scene, nodes):
    """What DICOM import makes in the application: the volumes under a patient and a study."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Knee CT/MR study")
    for node in nodes:
        sh.CreateItem(study, node)
    return sh, study


def _add_slice_views(scene, names=("Red", "Yellow", "Green")):
    import slicer

    views = []
    for name in names:  # one composite node per slice view, as the application's layout makes them
        comp = slicer.vtkMRMLSliceCompositeNode()
        comp.SetLayoutName(name)
        views.append(scene.AddNode(comp))
    return views


def test_registration_logic_loads_the_true_transform_and_maps_ct_landmarks_to_mr(mrml_scene, knee, tmp_path):
    from CTSMALib import flows
    from CTSMALib import scene_bridge as sb
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    TrueRegistration.row = knee
    ct, mr = _load(mrml_scene, knee["ct"], "CT"), _load(mrml_scene, knee["mr"], "MR")
    sh, study = _patient_study(mrml_scene, [ct, mr])
    logic = CTSMARegistrationLogic(runner_factory=TrueRegistration, work_root=tmp_path)
    run = logic.startRegistration(mr, ct)
    status = logic.wait(timeout=120)
    assert status.state == DONE, status.last_error or (run.work_dir / "run.log").read_text()
    tnode = run.outputs["transform"]
    assert set(run.outputs) == {"transform", "mr_in_ct", "qa"}  # no synthesis: no pseudo-CT
    assert not tnode.IsLinear() and tnode.GetAttribute("CTSMA.GridInterpolation") == "linear"

    # the landmarks, by hand: LPS -> RAS, the node's FromParent mapping, RAS -> LPS
    ct_lps, mr_lps = flows.read_landmarks(knee["landmarks"])
    flip = np.array([-1.0, -1.0, 1.0])
    mapped = np.array([np.array(tnode.GetTransformFromParent().TransformPoint(tuple(p * flip))) * flip
                       for p in ct_lps])
    assert len(ct_lps) >= 8 and np.abs(mapped - mr_lps).max() < 1e-3
    assert np.linalg.norm(ct_lps - mr_lps, axis=1).min() > 1.0  # the check is not trivial: CT != MR points
    assert flows.landmark_errors(tnode, knee["landmarks"]).max() < 1e-3
    wrong_way = np.array([np.array(tnode.GetTransformToParent().TransformPoint(tuple(p * flip))) * flip
                          for p in ct_lps])
    assert np.abs(wrong_way - mr_lps).max() > 1.0  # ToParent is the other direction
    # cubic grid interpolation (Slicer's default) would not reproduce ITK's linear one exactly
    sb.set_grid_interpolation(tnode, "cubic")
    assert flows.landmark_errors(tnode, knee["landmarks"]).max() > 1e-3
    sb.set_grid_interpolation(tnode, "linear")
    # a saved and reloaded scene gets the linear interpolation back (transform files do not store it)
    from CTSMALib.headless import HeadlessSlicer

    mrb = sb.save_scene_mrb(mrml_scene, tmp_path / "reg.mrb")
    with HeadlessSlicer(cache_dir=tmp_path / "reload", install_globals=False) as hs:
        sb.load_scene_mrb(hs.scene, mrb)
        again = hs.scene.GetFirstNodeByName(tnode.GetName())
        assert flows.landmark_errors(again, knee["landmarks"]).max() < 1e-3

    # outputs are grouped under the CT's study; the QA table is there
    folder = flows.results_folder(mrml_scene, tnode)
    assert folder["name"] == "CT-SMA registration" and folder["parent"] == study
    qa, units = sb.node_to_dataframe(run.outputs["qa"])
    assert list(qa["name"]) == ["truth", "total"] and units.get("seconds") == "s"

    # fade view: every slice view shows CT under MR-in-CT at the chosen opacity
    assert logic.showAlignment(ct, run.outputs["mr_in_ct"], 0.3) == 0  # no views without the application
    views = _add_slice_views(mrml_scene)
    assert logic.showAlignment(ct, run.outputs["mr_in_ct"], 0.3) == 3
    assert {(v.GetBackgroundVolumeID(), v.GetForegroundVolumeID(), round(v.GetForegroundOpacity(), 6))
            for v in views} == {(ct.GetID(), run.outputs["mr_in_ct"].GetID(), 0.3)}
    with pytest.raises(ValueError, match=r"opacity must be between 0 and 1 \(got 1.5\)"):
        logic.showAlignment(ct, run.outputs["mr_in_ct"], 1.5)

    # checkerboard: each voxel is the rescaled CT or the rescaled MR, in alternating squares
    board = logic.showCheckerboard(ct, run.outputs["mr_in_ct"], squareMm=30.0)
    assert all(v.GetBackgroundVolumeID() == board.GetID() and v.GetForegroundVolumeID() is None for v in views)
    from CTSMALib.views import _unit_range

    arr = sitk.GetArrayFromImage(sb.volume_node_to_sitk(board))
    a = sitk.GetArrayFromImage(_unit_range(sb.volume_node_to_sitk(ct)))
    b = sitk.GetArrayFromImage(_unit_range(sb.volume_node_to_sitk(run.outputs["mr_in_ct"])))
    from_ct, from_mr = np.isclose(arr, a, atol=1e-6), np.isclose(arr, b, atol=1e-6)
    assert (from_ct | from_mr).all()
    differ = ~np.isclose(a, b, atol=1e-3)
    assert 0.3 < from_ct[differ].mean() < 0.7  # about half the squares each
    x_line = from_ct[arr.shape[0] // 2, arr.shape[1] // 2] & differ[arr.shape[0] // 2, arr.shape[1] // 2]
    assert board.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    assert x_line.any()
    assert logic.showCheckerboard(ct, run.outputs["mr_in_ct"]).GetID() != board.GetID()  # replaced, not piled up
    assert mrml_scene.GetNodesByName("CT/MR checkerboard").GetNumberOfItems() == 1


class QAFailedRegistration(TrueRegistration):
    """``ctsma register`` on a pair whose bones miss each other: every output written, then the QA's exit code."""

    BODY = TrueRegistration.BODY + """
    print("error: registration QA failed: femur Dice 0.00 < 0.6: the pair is not usable", file=sys.stderr)
    from ctsma.registration.qa import EXIT_QA_FAILED
    sys.exit(EXIT_QA_FAILED)
    """


def test_a_registration_that_failed_its_qa_is_loaded_with_a_warning(mrml_scene, knee, tmp_path):
    """The pair is written for inspection: the module loads it (the fade view is how to see what went wrong) and
    says why it is not usable, instead of loading nothing; an exit code that means failure still loads nothing."""
    from CTSMALib.process import FAILED
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    QAFailedRegistration.row = knee
    ct, mr = _load(mrml_scene, knee["ct"], "CT"), _load(mrml_scene, knee["mr"], "MR")
    logic = CTSMARegistrationLogic(runner_factory=QAFailedRegistration, work_root=tmp_path)
    run = logic.startRegistration(mr, ct)
    status = logic.wait(timeout=120)
    assert status.state == DONE and set(run.outputs) == {"transform", "mr_in_ct", "qa"}
    assert "femur Dice 0.00 < 0.6" in status.warning and not status.last_error
    logic.cleanupRun(keep_outputs=False)

    class Broken(TrueRegistration):
        BODY = TrueRegistration.BODY + "\n    sys.exit(1)\n"
    Broken.row = knee
    logic = CTSMARegistrationLogic(runner_factory=Broken, work_root=tmp_path / "b")
    run = logic.startRegistration(mr, ct)
    assert logic.wait(timeout=120).state == FAILED and not run.outputs


def test_analysis_outputs_follow_the_ct_and_survive_a_scene_bundle(mrml_scene, knee, tmp_path):
    from CTSMALib import flows
    from CTSMALib import scene_bridge as sb
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.headless import HeadlessSlicer

    TrueAnalysis.row = knee
    ct = _load(mrml_scene, knee["ct"], "Knee CT")
    sh, study = _patient_study(mrml_scene, [ct])
    logic = CTSMALogic(runner_factory=TrueAnalysis, work_root=tmp_path / "work")
    out = flows.analysis_flow(logic, ct, side=knee["side"])  # bones -> ROIs -> analysis, each step checked
    args = logic.run.runner.args
    assert args[-2:] == ["--side", knee["side"]] and "--subject=Knee CT" in args  # not 'ct'
    assert flows.segment_names(out["rois"]) == list(ROIS)  # MFC, LFC, MTP, LTP in label order
    assert sorted(flows.segment_names(out["bones"])) == sorted(["femur", "tibia", "patella", "fibula"])

    ct_img = sb.volume_node_to_sitk(ct)
    for param in PARAMETERS:
        img = sb.volume_node_to_sitk(out[param])
        assert img.GetSize() == ct_img.GetSize()
        np.testing.assert_allclose(img.GetOrigin(), ct_img.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetSpacing(), ct_img.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(img.GetDirection(), ct_img.GetDirection(), atol=1e-6)
        colors = out[param].GetDisplayNode().GetColorNode().GetName()
        assert colors == "CTSMA_" + {"BV/TV": "BVTV", "Tb.Th": "TbTh", "Tb.Sp": "TbSp", "Tb.N": "TbN"}[param]
    table = out["roi_table"]
    assert len(table) == 16 and sorted(set(table["roi"])) == sorted(ROIS) and set(table["parameter"]) == set(PARAMETERS)
    for rec in table.to_dict("records"):
        assert rec["mean"] == pytest.approx(knee[f"true_{rec['roi']}_{rec['parameter']}"])
    # a map voxel inside an ROI holds that ROI's value, at the same physical place as the phantom's ROI label
    rois = sitk.ReadImage(str(knee["ct_rois"]))
    idx = tuple(int(i) for i in np.argwhere(sitk.GetArrayViewFromImage(rois) == 3)[0][::-1])  # (x, y, z), MTP
    tbth = sb.volume_node_to_sitk(out["Tb.Th"])
    point = rois.TransformIndexToPhysicalPoint(idx)
    point = tuple(np.array(point) - np.array(rois.GetOrigin()) + np.array(ct_img.GetOrigin()))
    assert tbth[tbth.TransformPhysicalPointToIndex(point)] == pytest.approx(knee["true_MTP_Tb.Th"], rel=1e-6)

    folder = flows.results_folder(mrml_scene, out["table"])
    assert folder["name"] == "CT-SMA results" and folder["parent"] == study
    assert sh.GetItemParent(sh.GetItemByDataNode(out["rois"])) == folder["item"]

    mrb = sb.save_scene_mrb(mrml_scene, tmp_path / "scene" / "knee.mrb")
    with HeadlessSlicer(cache_dir=tmp_path / "reload-cache", install_globals=False) as hs:
        sb.load_scene_mrb(hs.scene, mrb)
        scene = hs.scene
        import slicer

        sh2 = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        ct2 = scene.GetFirstNodeByName("Knee CT")
        for param in PARAMETERS:
            node = scene.GetFirstNodeByName(f"Knee CT {param}")
            assert node.GetAttribute("CTSMA.Parameter") == param
            assert node.GetDisplayNode().GetColorNode().GetName().startswith("CTSMA_")
            img = sb.volume_node_to_sitk(node)
            np.testing.assert_allclose(img.GetOrigin(), ct_img.GetOrigin(), atol=1e-4)
        table2, _ = sb.node_to_dataframe(scene.GetFirstNodeByName("Knee CT ROI table"))
        pd.testing.assert_frame_equal(table2.reset_index(drop=True), table.reset_index(drop=True), check_dtype=False)
        rois2 = scene.GetFirstNodeByName(out["rois"].GetName())
        assert flows.segment_names(rois2) == list(ROIS)
        folder2 = flows.results_folder(scene, scene.GetFirstNodeByName("Knee CT ROI table"))
        assert folder2["name"] == "CT-SMA results"
        assert folder2["parent"] == sb.study_item_of(scene, ct2) and sh2.GetItemLevel(folder2["parent"]) == "Study"


def test_results_without_a_study_go_to_the_top_of_the_scene(mrml_scene, tmp_path):
    import slicer

    from CTSMALib import scene_bridge as sb

    node = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    folder = sb.put_in_folder(mrml_scene, [node], "CT-SMA results", under=None)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    assert sh.GetItemParent(folder) == sh.GetSceneItemID()
    ct = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")  # a CT with no patient/study
    assert sb.study_item_of(mrml_scene, ct) == sh.GetSceneItemID()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "P")
    sh.CreateItem(patient, ct)  # patient but no study: the patient is used
    assert sb.study_item_of(mrml_scene, ct) == patient


def test_registration_can_place_the_mr_under_the_transform_instead_of_resampling(mrml_scene, knee, tmp_path):
    from CTSMALib import flows
    from CTSMALib.parameters import RegistrationParameters
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    TrueRegistration.row = knee
    ct, mr = _load(mrml_scene, knee["ct"], "CT"), _load(mrml_scene, knee["mr"], "MR")
    logic = CTSMARegistrationLogic(runner_factory=TrueRegistration, work_root=tmp_path)
    out = flows.registration_flow(logic, mr, ct, RegistrationParameters(resampleMr=False),
                                  landmarks_csv=knee["landmarks"])
    assert "mr_in_ct" not in out and mrml_scene.GetFirstNodeByName("MR in CT") is None
    assert mr.GetParentTransformNode() is out["transform"]  # Slicer shows the MR in CT space through it
    assert out["landmark_errors_mm"].max() < 1e-3
