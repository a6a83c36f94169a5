"""Clicking through the modules a second time (thirty-fourth session review), on the real MRML scene.

A clinician reruns the analysis of the same CT, analyses a second CT, cancels a run, changes the selected CT while a
run goes on, and registers the same MR and CT again. Each rerun must replace the earlier results instead of leaving
two sets of nodes of the same names; the views must show the CT that was analysed; a cancelled run must leave no
copy of the CT behind; and a second registration of a pair must not be refused because of the first one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTSMALib.process import CANCELLED, DONE, FAILED, RUNNING, RunStatus

pytestmark = pytest.mark.mrml

REPO = Path(__file__).resolve().parent.parent


def _ct_image(seed=0):
    arr = np.random.default_rng(seed).normal(40, 5, (8, 9, 10)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.7, 1.0))
    img.SetOrigin((1.0, -2.0, 3.0))
    return img


def _volume(scene, name, seed=0):
    from CTSMALib import scene_bridge as sb

    return sb.sitk_to_volume_node(_ct_image(seed), scene, name)


def _write_analysis(args, diagnosis=True):
    """What ``ctsma infer`` writes (maps, uncertainty, labels, table, summary), in this process."""
    out = Path(args[args.index("--out") + 1])
    (out / "maps").mkdir(parents=True)
    (out / "uncertainty").mkdir()
    ct = sitk.ReadImage(args[1])
    lab = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    lab[:4], lab[4:] = 2, 1
    for name, arr in (("bones", lab), ("rois", np.where(lab == 1, 1, 3).astype(np.uint8))):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ct)
        sitk.WriteImage(img, str(out / f"{name}.nii.gz"))
    for folder in ("maps", "uncertainty"):
        for stem in ("bvtv", "tbth", "tbsp", "tbn"):
            m = sitk.GetImageFromArray(np.full(lab.shape, 0.25, np.float32))
            m.CopyInformation(ct)
            sitk.WriteImage(m, str(out / folder / f"{stem}.nii.gz"))
    (out / "roi_table.csv").write_text("roi,parameter,mean,sd,median,iqr,n_patches\nMFC,Tb.Th,0.21,0.02,0.2,0.03,12\n")
    summary = {"oa_probability": 0.7, "severity": 2.1, "auc": 0.81, "model": {"demo": True}} if diagnosis else {}
    (out / "summary.json").write_text(json.dumps(summary))


def _write_segmentation(args):
    """What ``ctsma segment`` writes: ``bones.nii.gz``, and ``rois.nii.gz`` unless ``--no-rois``."""
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    ct = sitk.ReadImage(args[1])
    lab = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    lab[:4], lab[4:] = 2, 1
    for name, arr in (("bones", lab), ("rois", np.where(lab == 1, 1, 3).astype(np.uint8))):
        if name == "bones" or "--no-rois" not in args:
            img = sitk.GetImageFromArray(arr)
            img.CopyInformation(ct)
            sitk.WriteImage(img, str(out / f"{name}.nii.gz"))


class Runner:
    """An in-process stand-in for the background ``ctsma`` process: it writes its outputs when started (unless
    ``state`` says the run is still going or failed) and reports ``state``."""

    state = DONE
    diagnosis = True

    def start_ctsma(self, args, work_dir, env=None, **_):
        self.args, self.work_dir = list(args), Path(work_dir)
        self.cancelled = False
        if self.state == DONE and args[0] == "infer":
            _write_analysis(args, diagnosis=self.diagnosis)
        if self.state == DONE and args[0] == "register":
            _write_registration(args)
        if self.state == DONE and args[0] == "segment":
            _write_segmentation(args)

    def poll(self):
        return RunStatus(state=CANCELLED if self.cancelled else self.state,
                         last_error="ctsma infer: error: no knee" if self.state == FAILED else "")

    def cancel(self):
        self.cancelled = True
        return self.poll()


def _runner(state=DONE, diagnosis=True):
    return type("R", (Runner,), {"state": state, "diagnosis": diagnosis})


def _names(scene, cls="vtkMRMLNode"):
    return sorted(scene.GetNthNodeByClass(i, cls).GetName() for i in range(scene.GetNumberOfNodesByClass(cls)))


def test_a_second_analysis_of_the_same_ct_replaces_its_maps_and_tables(mrml_scene, tmp_path):
    """Before: every rerun added a second set of 'CT Tb.Th', 'CT ROI table', ... (11 nodes of the same names), and a
    rerun without a diagnosis left the first run's 'CT diagnosis' table in the results as if it were this one's."""
    import slicer
    from CTSMALib import flows
    from CTSMALib.analysis_logic import CTSMALogic

    ct, other = _volume(mrml_scene, "CT", 0), _volume(mrml_scene, "Other CT", 1)
    logic = CTSMALogic(runner_factory=_runner(), work_root=tmp_path)
    logic.startAnalysis(other)
    other_out = flows.finish(logic, "analysis of the other CT").outputs
    logic.cleanupRun(keep_outputs=True)
    logic.startAnalysis(ct)
    first = flows.finish(logic, "first analysis").outputs
    logic.cleanupRun(keep_outputs=True)
    volumes_before = mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    displays_before = mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeDisplayNode")

    logic.runnerFactory = _runner(diagnosis=False)  # another model: no diagnosis this time
    logic.startAnalysis(ct, roiSegmentation=first["rois"])
    second = flows.finish(logic, "second analysis").outputs
    logic.cleanupRun(keep_outputs=True)
    tables = _names(mrml_scene, "vtkMRMLTableNode")
    assert tables.count("CT ROI table") == 1 and "CT diagnosis" not in tables and "CT analysis notes" not in tables
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeDisplayNode") == displays_before  # none orphaned
    assert mrml_scene.GetFirstNodeByName("CT Tb.Th") is second["Tb.Th"]
    assert not mrml_scene.IsNodePresent(first["Tb.Th"]) and not mrml_scene.IsNodePresent(first["table"])
    # the segmentations stay (they may be edited, and this run read the ROIs); the other CT's results are its own
    assert mrml_scene.IsNodePresent(first["rois"]) and mrml_scene.IsNodePresent(first["bones"])
    assert all(mrml_scene.IsNodePresent(node) for node in other_out.values())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    folder = flows.results_folder(mrml_scene, second["table"])["item"]
    children = [sh.GetItemName(i) for i in _children(sh, folder)]
    assert children.count("CT Tb.Th") == 1 and children.count("Other CT Tb.Th") == 1

    assert first["rois"].GetName() == "CT subchondral ROIs"  # named as 'Create subchondral ROIs' names them
    assert second["Tb.Th uncertainty"].GetAttribute("CTSMA.Unit") == "mm"  # a standard deviation, in mm
    assert second["Tb.Th uncertainty"].GetAttribute("CTSMA.Result") == "Tb.Th uncertainty"
    # a rerun that fails leaves the last results as they were
    logic.runnerFactory = _runner(FAILED)
    logic.startAnalysis(ct)
    assert logic.poll().state == FAILED
    assert mrml_scene.IsNodePresent(second["Tb.Th"]) and mrml_scene.IsNodePresent(second["table"])


def _children(sh, item):
    import vtk

    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def test_the_module_releases_each_run_s_work_folder(mrml_scene, tmp_path):
    """Before: the module never cleaned up after an analysis, so a cancelled analysis's folder, with its copy of
    the patient's CT, stayed in the temporary folder for good (a cancelled bone segmentation's was removed)."""
    from CTSMALib.analysis_logic import CTSMALogic

    ct = _volume(mrml_scene, "CT")
    logic = CTSMALogic(runner_factory=_runner(RUNNING), work_root=tmp_path)
    cancelled = logic.startAnalysis(ct).work_dir
    assert logic.cancel().state == CANCELLED and (cancelled / "ct.nii").exists()
    logic.releaseRun()  # what the module does once it has shown the end of the run
    assert not cancelled.exists() and logic.run is None

    logic.runnerFactory = _runner(FAILED)
    failed = logic.startAnalysis(ct).work_dir
    assert logic.poll().state == FAILED
    logic.releaseRun()
    assert (failed / "ct.nii").exists()  # kept with its log for now

    logic.runnerFactory = _runner()
    done = logic.startAnalysis(ct).work_dir
    assert logic.poll().state == DONE
    logic.releaseRun()
    assert (done / "out" / "summary.json").exists()  # the report reads it
    report = logic.startReportExport(done / "out", tmp_path / "report", subject=ct).work_dir
    assert logic.poll().state == DONE
    logic.releaseRun()
    assert not report.exists() and (done / "ct.nii").exists()
    logic.removeAnalysisFolders()  # the module closing: no copy of the CT stays behind, failed or not
    assert not failed.exists() and not done.exists()


def test_results_are_shown_on_the_ct_that_was_analysed(mrml_scene, tmp_path):
    """Before: when the analysis ended, the module put its Tb.Th map over whatever CT the selector showed then, so
    choosing the next patient's CT during the run showed one patient's map over the other's CT."""
    from CTSMALib import flows
    from CTSMALib.analysis_logic import CTSMALogic

    views = []
    for name in ("Red", "Yellow", "Green"):
        comp = mrml_scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        comp.SetLayoutName(name)
        views.append(comp)
    first, second = _volume(mrml_scene, "Patient A CT", 0), _volume(mrml_scene, "Patient B CT", 1)
    logic = CTSMALogic(runner_factory=_runner(), work_root=tmp_path)
    logic.startAnalysis(first)
    run = flows.finish(logic, "analysis")
    # meanwhile the user selected Patient B's CT; the module shows what the run analysed
    assert logic.showResults(run) == 3
    assert {(v.GetBackgroundVolumeID(), v.GetForegroundVolumeID()) for v in views} == \
        {(first.GetID(), run.outputs["Tb.Th"].GetID())}
    assert second.GetID() not in {v.GetBackgroundVolumeID() for v in views}
    analysis = (REPO / "CTSMA" / "CTSMA.py").read_text(encoding="utf-8")
    assert "background=p.ctVolume" not in analysis and "self.logic.showResults(run)" in analysis
    registration = (REPO / "CTSMARegistration" / "CTSMARegistration.py").read_text(encoding="utf-8")
    assert "showAlignment(p.ctVolume, p.mrInCtVolume or p.mrVolume, p.fadeOpacity)" not in registration


# -- registration ------------------------------------------------------------------------------------------------
SHIFT_LPS = np.array([3.0, -2.0, 1.5])  # the fake registration's CT -> MR translation


def _write_registration(args):
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True)
    tx = sitk.TranslationTransform(3, tuple(SHIFT_LPS))
    sitk.WriteTransform(tx, str(out / "transform_ct_to_mr.h5"))
    mr, ct = sitk.ReadImage(args[1]), sitk.ReadImage(args[2])
    sitk.WriteImage(sitk.Resample(mr, ct, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32), str(out / "mr_in_ct.nii.gz"))
    (out / "qa.json").write_text(json.dumps({"stages": [{"name": "rigid", "kept": True, "seconds": 0.1}],
                                             "total_seconds": 0.1}))
    os.replace(args[1], str(Path(args[1]).with_name("mr-as-read.nii")))  # what the command read, for the test to check


def test_registering_the_same_pair_again_replaces_its_outputs(mrml_scene, tmp_path):
    """Before: a registration with 'MR resampled into CT space' off put the MR under its transform, and every later
    registration of that MR was refused ('is under a transform: harden it first', or, with the option on, 'under a
    non-linear transform'); hardening would have registered an already registered MR. Registering again with the
    option on also added a second transform, 'MR in CT' and QA table of the same names."""
    from CTSMALib import flows
    from CTSMALib import scene_bridge as sb
    from CTSMALib.parameters import RegistrationParameters
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    ct, mr = _volume(mrml_scene, "CT", 0), _volume(mrml_scene, "MR", 2)
    acquired = sb.volume_node_to_sitk(mr)
    logic = CTSMARegistrationLogic(runner_factory=_runner(), work_root=tmp_path)

    def register(resample):
        run = logic.startRegistration(mr, ct, params=RegistrationParameters(resampleMr=resample))
        out = dict(flows.finish(logic, "registration").outputs)
        read = sitk.ReadImage(str(run.work_dir / "mr-as-read.nii"))  # the MR as the command line got it
        np.testing.assert_allclose(read.GetOrigin(), acquired.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(read.GetDirection(), acquired.GetDirection(), atol=1e-6)
        logic.cleanupRun()
        return out

    first = register(resample=False)
    assert mr.GetParentTransformNode() is first["transform"]
    second = register(resample=False)  # was refused
    assert mr.GetParentTransformNode() is second["transform"] and not mrml_scene.IsNodePresent(first["transform"])
    third = register(resample=True)  # was refused; the MR stays shown in CT space, through the new transform
    assert mr.GetParentTransformNode() is third["transform"]
    fourth = register(resample=True)
    assert _names(mrml_scene, "vtkMRMLTransformNode") == ["CT to MR transform"]
    assert _names(mrml_scene, "vtkMRMLTableNode") == ["MR registration QA"]
    assert [n for n in _names(mrml_scene, "vtkMRMLScalarVolumeNode") if n.startswith("MR in")] == ["MR in CT"]
    assert mr.GetParentTransformNode() is fourth["transform"]
    point = np.array([5.0, 6.0, 7.0])  # RAS; the transform maps CT points to MR points (contract)
    mapped = sb.transform_point_ras(fourth["transform"], point)
    np.testing.assert_allclose(mapped, point + SHIFT_LPS * [-1, -1, 1], atol=1e-6)

    # a transform of the user's own is still refused when the MR would be placed under another one
    own = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual pre-alignment")
    mr.SetAndObserveTransformNodeID(own.GetID())
    from ctsma.errors import InputImageError

    with pytest.raises(InputImageError, match="is under a transform: harden it first"):
        logic.startRegistration(mr, ct, params=RegistrationParameters(resampleMr=False))
    # and a registration transform of another CT is not this pair's
    other = _volume(mrml_scene, "Other CT", 3)
    mr.SetAndObserveTransformNodeID(fourth["transform"].GetID())
    assert logic.earlierTransform(mr, other) is None and logic.earlierTransform(mr, ct) is fourth["transform"]


def test_segmenting_the_same_ct_again_gives_the_new_segmentations_names_of_their_own(mrml_scene, tmp_path):
    """A second bone segmentation or ROI creation of one CT added a second 'CT bones' (and 'CT subchondral ROIs'):
    the selectors showed two of one name. The earlier ones stay (they may have been edited) under their names."""
    from CTSMALib import flows
    from CTSMALib.analysis_logic import CTSMALogic

    ct = _volume(mrml_scene, "CT")
    logic = CTSMALogic(runner_factory=_runner(), work_root=tmp_path)
    outputs = []
    for k in range(3):
        logic.startBoneSegmentation(ct)
        bones = flows.finish(logic, f"bone segmentation {k}").outputs["bones"]
        logic.cleanupRun()
        logic.startRoiCreation(ct, bones)
        outputs += [bones, flows.finish(logic, f"ROI creation {k}").outputs["rois"]]
        logic.cleanupRun()
    names = [node.GetName() for node in outputs]
    assert names == ["CT bones", "CT subchondral ROIs", "CT bones_1", "CT subchondral ROIs_1", "CT bones_2",
                     "CT subchondral ROIs_2"]
    assert all(mrml_scene.IsNodePresent(node) for node in outputs)
    assert sorted(_names(mrml_scene, "vtkMRMLSegmentationNode")) == sorted(names)
