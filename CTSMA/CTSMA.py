"""CTSMA: subchondral trabecular bone microstructure (BV/TV, Tb.Th, Tb.Sp, Tb.N) from knee CT.

The work lives in ``CTSMALib`` (beside this file) and in the ``ctsma`` package, run as a background
``ctsma`` process; ``CTSMALogic`` runs headless. This file holds the module, its GUI and the self-tests.
"""

from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *  # noqa: F403
from slicer.util import VTKObservationMixin

from CTSMALib.analysis_logic import CTSMALogic  # noqa: F401  (Slicer looks it up here)
from CTSMALib.cli_args import TRAINING_KINDS
from CTSMALib.gui import RunMonitor, bindMachineSettings, reloadLib, showFailure
from CTSMALib.parameters import DEVICES, SIDES, AnalysisParameters
from CTSMALib.sample_data import register_sample_data
from CTSMALib.settings import MachineSettings, QSettingsStore

# Every widget this file uses, with its class in Resources/UI/CTSMA.ui (checked by tests).
UI_WIDGETS = {
    "ctVolumeSelector": "qMRMLNodeComboBox", "boneSegmentationSelector": "qMRMLNodeComboBox", "createRoisButton": "QPushButton",
    "roiSegmentationSelector": "qMRMLNodeComboBox", "segmentBonesButton": "QPushButton", "kneeSideComboBox": "QComboBox", "modelPathLineEdit": "ctkPathLineEdit", "deviceComboBox": "QComboBox", "matchSharpnessCheckBox": "QCheckBox",
    "runButton": "QPushButton", "progressBar": "QProgressBar", "stageLabel": "QLabel",
    "outputTableSelector": "qMRMLNodeComboBox", "reportDirButton": "ctkDirectoryButton",
    "exportReportButton": "QPushButton", "trainingCollapsibleButton": "ctkCollapsibleButton",
    "trainingKindComboBox": "QComboBox", "trainingConfigLineEdit": "ctkPathLineEdit", "trainingOutputDirButton": "ctkDirectoryButton",
    "startTrainingButton": "QPushButton", "trainingDataLineEdit": "ctkPathLineEdit", "trainingStatusLabel": "QLabel",
    "loadSampleButton": "QPushButton", "trainingPythonLineEdit": "ctkPathLineEdit", "clusterTemplateLineEdit": "QLineEdit",
    "cacheDirButton": "ctkDirectoryButton", "torchBackendComboBox": "QComboBox",
}
TORCH_BUILDS = ["auto", "cpu", "cu118", "cu121", "cu124", "cu126"]


def _path(p) -> str:
    """'' for an unset Path parameter (the wrapper stores Path('.'))."""
    return "" if p is None or str(p) in ("", ".") else str(p)


class CTSMA(ScriptedLoadableModule):  # noqa: F405
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = _("CT-SMA")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["CT-SMA developers"]
        self.parent.helpText = _("Subchondral trabecular bone microstructure analysis of the knee from clinical CT: "
                                 "bone segmentation, subchondral ROIs, BV/TV, Tb.Th, Tb.Sp and Tb.N maps and an "
                                 "ROI table, with a PDF and HTML report. See docs/slicer.md in the CT-SMA repository.")
        self.parent.acknowledgementText = _("CT-SMA: knowledge distilled from high-resolution MR into clinical CT.")
        slicer.app.connect("startupCompleted()", register_sample_data)  # 'CT-SMA phantom knee' in Sample Data


@parameterNodeWrapper
class CTSMAParameterNode:
    ctVolume: vtkMRMLScalarVolumeNode
    boneSegmentation: vtkMRMLSegmentationNode
    roiSegmentation: vtkMRMLSegmentationNode
    kneeSide: Annotated[str, Choice(list(SIDES))] = "auto"
    modelPath: Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    matchSharpness: bool = True
    outputTable: vtkMRMLTableNode
    reportDir: Path
    trainingKind: Annotated[str, Choice(list(TRAINING_KINDS))] = "student"
    trainingConfig: Path
    trainingOutputDir: Path
    trainingData: Path


class CTSMAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):  # noqa: F405
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)  # noqa: F405
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = self.monitor = None
        self.lastResultDir = self.settings = None  # last analysis folder (for the report); machine settings

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)  # noqa: F405
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTSMA.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTSMALogic()
        self.ui.modelPathLineEdit.nameFilters = ["CT-SMA model (*.safetensors)", "All files (*)"]
        self.ui.trainingConfigLineEdit.nameFilters = ["Training configuration (*.yaml *.yml *.json)"]
        self.ui.trainingDataLineEdit.nameFilters = ["Cohort manifest (*.csv)", "All files (*)"]  # or type a folder
        self._setupSettings()
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        actions = {self.ui.segmentBonesButton: self.onSegmentBones, self.ui.createRoisButton: self.onCreateRois,
                   self.ui.runButton: self.onRun, self.ui.exportReportButton: self.onExportReport,
                   self.ui.startTrainingButton: self.onStartTraining}
        self.monitor = RunMonitor(self.logic, self.ui.progressBar, self.ui.stageLabel, list(actions),
                                  self.onRunFinished, onPoll=self.onRunProgress)
        for button, handler in actions.items():
            button.connect("clicked(bool)", lambda checked=False, b=button, h=handler: self._action(b, h))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneImported)
        self.initializeParameterNode()

    def onReload(self) -> None:
        reloadLib()
        ScriptedLoadableModuleWidget.onReload(self)  # noqa: F405

    def cleanup(self) -> None:
        self.monitor and self.monitor.stop()
        self.logic and self.logic.removeAnalysisFolders()  # no copy of a patient's CT left behind
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:  # GUI updates from the parameter node stop; a run goes on and its results still land
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneImported(self, caller, event) -> None:
        from CTSMALib.scene_bridge import reapply_grid_interpolation

        reapply_grid_interpolation(slicer.mrmlScene)  # transform files do not store it

    def _setupSettings(self) -> None:
        """Machine-level settings (qt.QSettings): device, Python for training, cluster command, cache, torch build."""
        self.settings = MachineSettings(QSettingsStore())
        bindMachineSettings(self.ui, self.settings, TORCH_BUILDS)

    def initializeParameterNode(self) -> None:
        fresh = not self.logic.getParameterNode().GetParameter("device")  # a new scene: use this computer's device
        self.setParameterNode(CTSMAParameterNode(self.logic.getParameterNode()))
        if fresh:
            self._parameterNode.device = self.settings.device
        if not self._parameterNode.ctVolume:
            self._parameterNode.ctVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        if self.monitor.isBusy() or not self._parameterNode:
            return
        p = self._parameterNode
        for name in ("boneSegmentation", "roiSegmentation"):  # another CT's segmentation is not this CT's
            if self.logic.madeFromAnother(getattr(p, name), p.ctVolume) is not None:
                setattr(p, name, None)
        hasCt = bool(p and p.ctVolume)
        self.ui.segmentBonesButton.enabled = hasCt
        self.ui.createRoisButton.enabled = hasCt and bool(p.boneSegmentation)
        self.ui.runButton.enabled = hasCt
        self.ui.exportReportButton.enabled = self.lastResultDir is not None and bool(_path(p.reportDir))
        self.ui.startTrainingButton.enabled = bool(_path(p.trainingConfig) and _path(p.trainingOutputDir))

    def _params(self) -> AnalysisParameters:
        p = self._parameterNode
        return AnalysisParameters(modelPath=_path(p.modelPath), device=p.device, side=p.kneeSide, matchSharpness=p.matchSharpness)

    def _action(self, button, handler) -> None:
        if self.monitor.isBusy():  # the active button reads "Cancel"
            self.monitor.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start: ") + button.text, waitCursor=True):
            from CTSMALib.dependencies import ensureDependencies

            ensureDependencies("CT-SMA", backend=self.settings.torchBackend)
            handler()
            self.monitor.begin(button)

    def onSegmentBones(self) -> None:
        self.logic.startBoneSegmentation(self._parameterNode.ctVolume, self._params())

    def onCreateRois(self) -> None:
        self.logic.startRoiCreation(self._parameterNode.ctVolume, self._parameterNode.boneSegmentation, self._params())

    def onRun(self) -> None:
        p = self._parameterNode
        self.logic.startAnalysis(p.ctVolume, self._params(), p.boneSegmentation, p.roiSegmentation)

    def onExportReport(self) -> None:
        p = self._parameterNode
        self.logic.startReportExport(self.lastResultDir, Path(_path(p.reportDir)), subject=p.ctVolume)

    def onStartTraining(self) -> None:
        p, s = self._parameterNode, self.settings
        self.ui.trainingStatusLabel.text = ""  # the previous training's result is not this one's
        self.logic.startTraining(p.trainingKind, Path(_path(p.trainingConfig)), Path(_path(p.trainingOutputDir)),
                                 self._params(), data=_path(p.trainingData) or None, python=s.trainingPython,
                                 clusterTemplate=s.clusterTemplate)

    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the sample phantom knee."), waitCursor=True):
            from CTSMALib.sample_data import load_sample_in_slicer

            self._parameterNode.ctVolume = load_sample_in_slicer()["ct"]

    def onRunProgress(self, status) -> None:
        progress = self.logic.trainingProgress()
        if progress is not None:
            self.ui.trainingStatusLabel.text = progress.message()

    def onRunFinished(self, status, run) -> None:
        showFailure(status)
        p = self._parameterNode or CTSMAParameterNode(self.logic.getParameterNode())
        if status.state == "done" and run is not None:
            out = run.outputs
            for role, name in (("bones", "boneSegmentation"), ("rois", "roiSegmentation"), ("table", "outputTable")):
                if role in out:
                    setattr(p, name, out[role])
            if "table" in out:
                self.lastResultDir = run.out_dir  # kept for the report export
                self.ui.stageLabel.text += self.logic.notesText(out)
                slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(out["table"].GetID())
                slicer.app.applicationLogic().PropagateTableSelection()  # the ROI table in the layout's table view
                self.logic.showResults(run)  # the analysed CT under its Tb.Th map, not the CT selected meanwhile
        model = self.logic.trainedModel() if status.state == "done" else None
        if model is not None:  # the new model becomes the Analysis model
            p.modelPath = model
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.ui.trainingStatusLabel.text += _(" Model: {path}").format(path=model)
        if status.state == "done" and run is not None and run.label == "report export":
            self.ui.stageLabel.text = _("Report: {path}").format(path=run.out_dir)
        if status.state == "cancelled" and run is not None and run.info.get("stopped"):  # a cluster job goes on
            self.ui.trainingStatusLabel.text = status.message
        if run is not None:
            self.logic.releaseRun()  # its work folder: kept for the report or the log, else removed
        self._updateButtons()


class CTSMATest(ScriptedLoadableModuleTest):  # noqa: F405
    """In-application self-tests: Logic wiring and cancel, then the whole flow on the sample phantom knee
    (generated once into the cache folder, then bones, ROIs, analysis and report with the real ctsma)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_logic_refuses_bad_inputs_and_cancels, self.test_whole_flow_on_sample_phantom):
            self.setUp()
            test()

    def test_logic_refuses_bad_inputs_and_cancels(self):
        import numpy as np
        from ctsma.errors import UserError

        logic = CTSMALogic()
        with self.assertRaises(UserError):
            logic.startBoneSegmentation(None)
        ct = slicer.util.addVolumeFromArray(np.full((16, 16, 16), -1000, "float32"), name="CT")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic.startBoneSegmentation(ct)
        if logic.cancel().state != "done":  # cancelled before it ended: nothing was added
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        logic.cleanupRun()

    def test_whole_flow_on_sample_phantom(self):
        import tempfile

        from CTSMALib import flows, sample_data

        self.delayDisplay("Sample phantom knee (generated on first use, about a minute)")
        paths = sample_data.ensure_sample_phantom(MachineSettings(QSettingsStore()).cacheDir,
                                                  on_poll=lambda status: slicer.app.processEvents())
        ct = sample_data.load_sample(paths, slicer.mrmlScene)["ct"]
        self.delayDisplay("Bones, ROIs, analysis and report (several minutes)")
        report = Path(tempfile.mkdtemp(prefix="CTSMATest-"))
        # Each step must succeed; the flow checks the 4 named ROIs, 4 maps on the CT grid, 4x4 table and folder.
        out = flows.analysis_flow(CTSMALogic(), ct, side=paths["side"], report_dir=report,
                                  on_wait=slicer.app.processEvents)
        self.assertGreater(out["report"].stat().st_size, 1000)
        self.delayDisplay("Test passed")
