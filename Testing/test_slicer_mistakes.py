"""User mistakes through the Slicer module logic (twenty-first session audit), on the real MRML scene.

Each must end in a clear error, or in the right result, never in a silently wrong one: segments exported by their
names, selectors swapped, a scene closed while a run goes on, a report under another patient's name, a pre-aligned
MR, a sheared volume, odd nodes and extra options. A refused start leaves no work folder behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctsma.errors import ConfigError, InputImageError, UserError

pytestmark = pytest.mark.mrml


def _ct_image():
    rng = np.random.default_rng(0)
    arr = np.full((12, 10, 8), 40.0, np.float32) + rng.normal(0, 5, (12, 10, 8)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.7, 1.0))
    img.SetOrigin((1.0, -2.0, 3.0))
    return img


@pytest.fixture()
def ct(mrml_scene):
    from CTSMALib import scene_bridge as sb

    return sb.sitk_to_volume_node(_ct_image(), mrml_scene, "CT")


def _segmentation(scene, ct, name, segments):
    """A segmentation drawn in the Segment Editor: named segments, each a slab of slices, no CT-SMA tag."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    shape = slicer.util.arrayFromVolume(ct).shape
    for seg_name, z in segments:
        sid = node.GetSegmentation().AddEmptySegment(seg_name, seg_name)
        mask = np.zeros(shape, np.uint8)
        mask[z] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, sid, ct)
    return node


def _exported(node, ct, kind):
    from CTSMALib.segmentations import segmentation_node_to_labelmap

    img, _ = segmentation_node_to_labelmap(node, ct, kind)
    return sitk.GetArrayFromImage(img)


def test_segments_are_exported_by_their_names_not_their_order(mrml_scene, ct):
    seg = _segmentation(mrml_scene, ct, "manual", [("Tibia", slice(0, 5)), ("fibula", slice(5, 6)),
                                                   ("cartilage", slice(6, 7)), ("femur", slice(7, 12))])
    with pytest.warns(UserWarning, match="'cartilage' are not bones"):
        arr = _exported(seg, ct, "bones")
    assert np.unique(arr[0:5]).tolist() == [2] and np.unique(arr[5]).tolist() == [4]
    assert np.unique(arr[6]).tolist() == [0] and np.unique(arr[7:]).tolist() == [1]
    # two segments of one bone (or an alias) give one label
    split = _segmentation(mrml_scene, ct, "split femur", [("femur", slice(0, 3)), ("Femoral", slice(9, 12))])
    arr = _exported(split, ct, "bones")
    assert np.unique(arr[0:3]).tolist() == [1] and np.unique(arr[9:]).tolist() == [1]


def test_a_label_image_imported_into_slicer_keeps_its_values(mrml_scene, ct):
    import slicer
    from CTSMALib import scene_bridge as sb

    lab = np.zeros(slicer.util.arrayFromVolume(ct).shape, np.uint8)
    lab[:4], lab[4:10], lab[10:] = 2, 1, 4
    img = sitk.GetImageFromArray(lab)
    img.CopyInformation(sb.volume_node_to_sitk(ct))
    tmp = sb.sitk_to_volume_node(img, mrml_scene, "labels", labelmap=True)
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "imported")
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tmp, seg)
    mrml_scene.RemoveNode(tmp)
    with pytest.warns(UserWarning, match="taken as they were imported"):
        arr = _exported(seg, ct, "bones")
    assert np.array_equal(arr, lab)


def test_swapped_selectors_and_odd_nodes_are_refused_before_any_work(mrml_scene, ct, tmp_path):
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib import scene_bridge as sb

    logic = CTSMALogic(work_root=tmp_path / "work")
    rois = _segmentation(mrml_scene, ct, "ROIs", [("MFC", slice(8, 10)), ("MTP", slice(2, 4))])
    bones = _segmentation(mrml_scene, ct, "bones", [("femur", slice(6, 12)), ("tibia", slice(0, 6))])
    with pytest.raises(InputImageError, match="holds subchondral ROIs .* not bones"):
        logic.startRoiCreation(ct, rois)
    with pytest.raises(InputImageError, match="holds bones .* not subchondral ROIs"):
        logic.startAnalysis(ct, roiSegmentation=bones)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(InputImageError, match="has no segments"):
        logic.startRoiCreation(ct, empty)
    labelmap = sb.sitk_to_volume_node(_ct_image() > 50, mrml_scene, "a label map", labelmap=True)
    with pytest.raises(InputImageError, match="is not a segmentation"):
        logic.startRoiCreation(ct, labelmap)
    with pytest.raises(InputImageError, match="is not a volume"):
        logic.startAnalysis(bones)
    unnamed = _segmentation(mrml_scene, ct, "unnamed", [("Segment_1", slice(0, 12))])
    unnamed.GetSegmentation().GetNthSegment(0).SetLabelValue(7)
    with pytest.raises(InputImageError, match="no segment of 'unnamed' is named femur"):
        logic.startRoiCreation(ct, unnamed)
    mrml_scene.RemoveNode(ct)
    with pytest.raises(InputImageError, match="volume 'CT' is no longer in the scene"):
        logic.startBoneSegmentation(ct)
    assert not any((tmp_path / "work").glob("*")), "a refused start left a work folder (with the patient's CT)"


def test_results_do_not_land_in_a_scene_that_lost_their_inputs(mrml_scene, ct, tmp_path):
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.process import DONE, FAILED, RunStatus

    class Later:
        """A run that ends when told to, having written nothing the loader needs (it must not get that far)."""

        def __init__(self):
            self.state = "running"

        def start_ctsma(self, args, work_dir, env=None, **_):
            pass

        def poll(self):
            return RunStatus(state=self.state)

    logic = CTSMALogic(runner_factory=Later, work_root=tmp_path)
    run = logic.startBoneSegmentation(ct)
    loaded = []
    run.loader = lambda r: loaded.append(r) or {}
    mrml_scene.RemoveNode(ct)  # or File > Close scene: the CT is gone while the run goes on
    run.runner.state = DONE
    status = logic.poll()
    assert status.state == FAILED and "was removed from the scene" in status.last_error and not loaded


def test_report_refuses_another_patient_s_name(tmp_path):
    from CTSMALib.analysis_logic import SUBJECT_FILE, CTSMALogic

    work = tmp_path / "infer-1"
    (work / "out").mkdir(parents=True)
    (work / "out" / "summary.json").write_text("{}")
    (work / "ct.nii").write_text("a CT")
    (work / SUBJECT_FILE).write_text("Patient A CT")
    logic = CTSMALogic(work_root=tmp_path / "w")
    with pytest.raises(UserError, match="the last analysis was of 'Patient A CT', not of the selected 'Patient B'"):
        logic.startReportExport(work / "out", tmp_path / "report", subject="Patient B")


def test_pre_aligned_mr_and_extra_options(mrml_scene, ct, tmp_path):
    from CTSMALib import scene_bridge as sb
    from CTSMALib.parameters import RegistrationParameters
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    mr = sb.sitk_to_volume_node(_ct_image(), mrml_scene, "MR")
    pre = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual pre-alignment")
    mr.SetAndObserveTransformNodeID(pre.GetID())
    logic = CTSMARegistrationLogic(work_root=tmp_path / "work")
    with pytest.raises(InputImageError, match="is under a transform: harden it first"):
        logic.startRegistration(mr, ct, params=RegistrationParameters(preset="nosynth", resampleMr=False))
    for extra, message in (('--model "synth.safetensors', "No closing quotation"),
                           ("--out elsewhere", "--out is set by the module"),
                           ("--threads=4", "--threads is set by the module")):
        with pytest.raises(ConfigError, match=message):
            logic.startRegistration(mr, ct, params=RegistrationParameters(preset="nosynth", extraArgs=extra))
    assert not any((tmp_path / "work").glob("*"))


def test_a_sheared_volume_is_refused(mrml_scene, ct, tmp_path):
    import vtk
    from CTSMALib.analysis_logic import CTSMALogic

    logic = CTSMALogic(work_root=tmp_path)

    shear = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shear")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 1, 0.3)
    shear.SetMatrixTransformToParent(m)
    ct.SetAndObserveTransformNodeID(shear.GetID())
    with pytest.raises(InputImageError, match="has a sheared grid"):
        logic.exportVolume(ct, tmp_path / "ct.nii")
    rotation = vtk.vtkMatrix4x4()
    rotation.SetElement(0, 0, 0.0), rotation.SetElement(0, 1, -1.0)
    rotation.SetElement(1, 0, 1.0), rotation.SetElement(1, 1, 0.0)
    shear.SetMatrixTransformToParent(rotation)
    assert sitk.ReadImage(str(logic.exportVolume(ct, tmp_path / "ct.nii"))).GetSize() == (8, 10, 12)  # rotation: fine


def test_training_mistakes(tmp_path, mrml_scene):
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.process import DONE, FAILED

    config = Path(__file__).resolve().parent.parent / "Resources" / "Configs" / "demo.yaml"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    logic = CTSMALogic(work_root=tmp_path / "w")
    with pytest.raises(UserError, match="cannot create the training output folder"):
        logic.startTraining("teacher", config, blocker / "out", data=str(tmp_path))

    class Nothing:
        """A 'Python' that exits 0 at once and trains nothing."""

        def start_ctsma(self, args, work_dir, env=None, **_):
            pass

        def poll(self):
            from CTSMALib.process import RunStatus
            return RunStatus(state=DONE)

    logic = CTSMALogic(runner_factory=Nothing, work_root=tmp_path / "w")
    store = tmp_path / "store"
    store.mkdir()
    (store / "patches.h5").write_text("")
    logic.startTraining("teacher", config, tmp_path / "out", data=str(store))
    status = logic.poll()
    assert status.state == FAILED and "without writing a training log" in status.last_error


def _quick_logic(tmp_path):
    """The analysis logic with a process that finishes at once and outputs that load as nothing: what these tests
    follow is the logic's folders and messages, not the analysis."""
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.process import DONE, RunStatus

    class Quick:
        def start_ctsma(self, args, work_dir, env=None, **_):
            pass

        def poll(self):
            return RunStatus(state=DONE)

    logic = CTSMALogic(runner_factory=Quick, work_root=tmp_path)
    logic.loadAnalysisOutputs = lambda *a, **k: {}
    return logic


def test_only_the_last_analysis_keeps_its_copy_of_the_ct(mrml_scene, ct, tmp_path):
    from CTSMALib.parameters import AnalysisParameters

    logic = _quick_logic(tmp_path)

    def analyse(**kw):
        run = logic.startAnalysis(ct, AnalysisParameters(**kw))
        assert (run.work_dir / "ct.nii").exists() and all(d.exists() for d in logic._analysisDirs)  # kept till done
        logic.poll()
        return run.work_dir

    first = analyse()
    assert (first / "ct.nii").exists()
    with pytest.raises(InputImageError, match="has no segments"):  # a refused start removes nothing
        logic.startAnalysis(ct, roiSegmentation=mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "e"))
    assert (first / "ct.nii").exists()
    second = analyse()
    assert not first.exists() and (second / "ct.nii").exists()  # the report reads the last one
    third = analyse(keepWorkDir=True)
    assert second.exists() and third.exists()
    logic.removeAnalysisFolders()  # the module closing: the last analysis asked to keep them
    assert second.exists() and third.exists()
    fourth = analyse()
    assert not second.exists() and not third.exists() and fourth.exists()
    logic.removeAnalysisFolders()  # the module closing: no copy of the CT stays behind
    assert not fourth.exists()


def test_a_segment_left_out_is_said_when_the_analysis_ends(mrml_scene, ct, tmp_path):
    """A misnamed ROI segment ('lateral tibia plateau' for LTP) is left out of the analysis. Before, the warning went
    to the Python console only: the analysis ended 'finished' with no LTP in it and nothing on screen said why."""
    from CTSMALib.process import DONE

    logic = _quick_logic(tmp_path)
    rois = _segmentation(mrml_scene, ct, "my ROIs", [("MFC", slice(8, 10)), ("MTP", slice(2, 4)),
                                                     ("lateral tibia plateau", slice(0, 2))])
    with pytest.warns(UserWarning, match="left out"):  # still in the Python console
        logic.startAnalysis(ct, roiSegmentation=rois)
    status = logic.poll()  # the module shows status.warning when the run has finished
    assert status.state == DONE and "segment(s) 'lateral tibia plateau' are not subchondral ROIs" in status.warning
    logic.releaseRun()
    run = logic.startAnalysis(ct)  # the next run does not repeat it
    assert not logic.poll().warning and "inputWarnings" not in run.info
