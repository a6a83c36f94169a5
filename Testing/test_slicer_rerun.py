"""Clicking through the modules a second time (thirty-fourth session review), on the real MRML scene.

A clinician reruns the analysis of the same CT, analyses a second CT, cancels a run, changes the selected CT while a
run goes on. Each rerun must replace the earlier results instead of leaving two sets of nodes of the same names; the
views must show the CT that was analysed; a cancelled run must leave no copy of the CT behind."""

from __future__ import annotations

import json
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
