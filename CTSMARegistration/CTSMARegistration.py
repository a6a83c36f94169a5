"""CTSMARegistration: register a high-resolution knee MR to the clinical CT (multi-stage,
synthesis-based), in a background ``ctsma register`` process.

The work lives in ``CTSMALib`` (installed beside this file): ``CTSMARegistrationLogic`` runs
headless and is tested without Qt; this file only holds the Slicer module, its GUI and the
self-test.
"""

from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *  # noqa: F403
from slicer.util import VTKObservationMixin

from CTSMALib.gui import RunMonitor, reloadLib, showFailure
from CTSMALib.parameters import RegistrationParameters
from CTSMALib.registration_logic import CTSMARegistrationLogic  # noqa: F401  (Slicer looks it up here)

# Every widget this file uses, with its class in Resources/UI/CTSMARegistration.ui (checked by tests).
UI_WIDGETS = {
    "mrVolumeSelector": "qMRMLNodeComboBox", "ctVolumeSelector": "qMRMLNodeComboBox",
    "boneSegmentationSelector": "qMRMLNodeComboBox", "presetComboBox": "QComboBox",
    "advancedCollapsibleButton": "ctkCollapsibleButton", "threadsSpinBox": "QSpinBox",
    "extraArgsLineEdit": "QLineEdit", "keepWorkDirCheckBox": "QCheckBox", "resampleMrCheckBox": "QCheckBox",
    "applyButton": "QPushButton", "progressBar": "QProgressBar", "stageLabel": "QLabel",
    "outputTransformSelector": "qMRMLNodeComboBox", "pseudoCtSelector": "qMRMLNodeComboBox",
    "mrInCtSelector": "qMRMLNodeComboBox", "qaTableSelector": "qMRMLNodeComboBox",
    "fadeSlider": "ctkSliderWidget", "checkerboardSquareSpinBox": "QDoubleSpinBox", "checkerboardButton": "QPushButton",
}


class CTSMARegistration(ScriptedLoadableModule):  # noqa: F405
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = _("CT-SMA Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["CT-SMA developers"]
        self.parent.helpText = _("Registers a high-resolution knee MR (moving) to the clinical CT (fixed): "
                                 "rigid, affine and deformable stages driven by an MR-to-pseudo-CT synthesis. "
                                 "The transform maps CT points to MR points (Slicer's FromParent direction). "
                                 "See docs/slicer.md in the CT-SMA repository.")
        self.parent.acknowledgementText = _("CT-SMA: subchondral trabecular bone microstructure analysis.")


@parameterNodeWrapper
class CTSMARegistrationParameterNode:
    mrVolume: vtkMRMLScalarVolumeNode
    ctVolume: vtkMRMLScalarVolumeNode
    boneSegmentation: vtkMRMLSegmentationNode
    preset: str = ""
    threads: Annotated[int, Minimum(0)] = 0
    extraArgs: str = ""
    keepWorkDir: bool = False
    resampleMr: bool = True
    outputTransform: vtkMRMLTransformNode
    pseudoCtVolume: vtkMRMLScalarVolumeNode
    mrInCtVolume: vtkMRMLScalarVolumeNode
    qaTable: vtkMRMLTableNode
    fadeOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    checkerboardSquareMm: Annotated[float, WithinRange(1.0, 100.0)] = 10.0


class CTSMARegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):  # noqa: F405
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)  # noqa: F405
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.monitor = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)  # noqa: F405
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTSMARegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTSMARegistrationLogic()
        self.ui.presetComboBox.addItem("(default)", "")
        for name in self.logic.presetNames():  # presets are files: the list may be empty
            self.ui.presetComboBox.addItem(name, name)
        self.monitor = RunMonitor(self.logic, self.ui.progressBar, self.ui.stageLabel, [self.ui.applyButton],
                                  self.onRunFinished)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.fadeSlider.connect("valueChanged(double)", self.onFade)
        self.ui.checkerboardButton.connect("clicked(bool)", self.onCheckerboard)
        self.initializeParameterNode()

    def onReload(self) -> None:
        reloadLib()
        ScriptedLoadableModuleWidget.onReload(self)  # noqa: F405

    def cleanup(self) -> None:
        if self.monitor:
            self.monitor.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Stop GUI updates from the parameter node; a run keeps going and its results still land.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(CTSMARegistrationParameterNode(self.logic.getParameterNode()))

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            index = self.ui.presetComboBox.findData(self._parameterNode.preset)
            self.ui.presetComboBox.currentIndex = max(index, 0)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.monitor.isBusy() or not self._parameterNode:
            return
        p = self._parameterNode
        ready = bool(p and p.mrVolume and p.ctVolume and p.mrVolume != p.ctVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (_("Register the MR to the CT") if ready else _("Select an MR and a CT volume")
                                       if not (p.mrVolume and p.mrVolume == p.ctVolume) else
                                       _("The MR and the CT must be two different volumes"))
        self.ui.checkerboardButton.enabled = bool(p.ctVolume and p.mrInCtVolume)

    def onFade(self, value) -> None:
        p = self._parameterNode
        if p and p.ctVolume and (p.mrInCtVolume or p.mrVolume):
            self.logic.showAlignment(p.ctVolume, p.mrInCtVolume or p.mrVolume, value)

    def onCheckerboard(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not build the checkerboard."), waitCursor=True):
            self.logic.showCheckerboard(p.ctVolume, p.mrInCtVolume, p.checkerboardSquareMm)

    def onApplyButton(self) -> None:
        if self.monitor.isBusy():  # Apply reads "Cancel" while a registration runs
            self.monitor.cancel()
            return
        p = self._parameterNode
        p.preset = self.ui.presetComboBox.currentData or ""
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            from CTSMALib.dependencies import ensureDependencies
            from CTSMALib.settings import MachineSettings, QSettingsStore

            ensureDependencies("CT-SMA Registration", backend=MachineSettings(QSettingsStore()).torchBackend)
            params = RegistrationParameters(preset=p.preset, threads=p.threads, extraArgs=p.extraArgs,
                                            keepWorkDir=p.keepWorkDir, resampleMr=p.resampleMr)
            self.logic.startRegistration(p.mrVolume, p.ctVolume, p.boneSegmentation, params)
            self.monitor.begin(self.ui.applyButton)

    def onRunFinished(self, status, run) -> None:
        showFailure(status)
        p = self._parameterNode or CTSMARegistrationParameterNode(self.logic.getParameterNode())
        if status.state == "done" and run is not None:
            p.outputTransform = run.outputs.get("transform")
            p.mrInCtVolume = run.outputs.get("mr_in_ct")
            p.pseudoCtVolume = run.outputs.get("pseudo_ct")
            p.qaTable = run.outputs.get("qa")
            # fade view: the registered CT in the background, its MR (in CT space) in the foreground, whatever the
            # selectors show now (they can change while a registration runs)
            self.logic.showAlignment(run.info["ct"], run.outputs.get("mr_in_ct") or run.info["mr"], p.fadeOpacity)
            slicer.util.resetSliceViews()
        if run is not None:
            self.logic.cleanupRun(keep_outputs=run.info.get("keepWorkDir") or status.state == "failed")
        self._checkCanApply()


class CTSMARegistrationTest(ScriptedLoadableModuleTest):  # noqa: F405
    """In-application self-tests: presets and cancel, then a real registration of the sample phantom knee
    checked against its true landmarks, with the fade and checkerboard views."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_presets_and_cancel, self.test_registration_on_sample_phantom):
            self.setUp()
            test()

    def test_presets_and_cancel(self):
        import numpy as np

        logic = CTSMARegistrationLogic()
        self.assertIsInstance(logic.presetNames(), list)
        mr = slicer.util.addVolumeFromArray(np.random.rand(16, 16, 16).astype("float32"), name="MR")
        ct = slicer.util.addVolumeFromArray(np.random.rand(16, 16, 16).astype("float32"), name="CT")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic.startRegistration(mr, ct)
        if logic.cancel().state != "done":  # cancelled before it ended: nothing was added
            self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        logic.cleanupRun()

    def test_registration_on_sample_phantom(self):
        import numpy as np

        from CTSMALib import flows, sample_data
        from CTSMALib.settings import MachineSettings, QSettingsStore

        self.delayDisplay("Sample phantom knee (generated on first use, about a minute)")
        paths = sample_data.ensure_sample_phantom(MachineSettings(QSettingsStore()).cacheDir,
                                                  on_poll=lambda status: slicer.app.processEvents())
        nodes = sample_data.load_sample(paths, slicer.mrmlScene)
        self.delayDisplay("Registering MR to CT (preset nosynth: several minutes)")
        logic = CTSMARegistrationLogic()
        out = flows.registration_flow(logic, nodes["mr"], nodes["ct"], RegistrationParameters(preset="nosynth"),
                                      landmarks_csv=paths["landmarks"], on_wait=slicer.app.processEvents)
        ctPoints, mrPoints = flows.read_landmarks(paths["landmarks"])
        before = np.linalg.norm(ctPoints - mrPoints, axis=1).mean()
        self.assertLess(out["landmark_errors_mm"].mean(), 0.5 * before)  # much closer than without registration
        self.assertGreater(logic.showAlignment(nodes["ct"], out["mr_in_ct"], 0.3), 0)
        self.assertIsNotNone(logic.showCheckerboard(nodes["ct"], out["mr_in_ct"]).GetImageData())
        self.delayDisplay("Test passed")
