"""Shared machinery of the CT-SMA module logics: parameter node, background ``ctsma`` runs.

A Logic starts one ``ctsma`` subcommand at a time through an injectable runner
(:class:`CTSMALib.process.ProcessRunner` by default; tests pass their own factory and swap the
process, not the science). Input nodes are written to a work folder first; when the run ends
*successfully*, its outputs are loaded into the scene by a loader function. A failed or
cancelled run adds no nodes.

Inside Slicer the base class is the real ``ScriptedLoadableModuleLogic``. Outside (the
``slicer-core`` wheel has no Qt, hence no ``slicer.ScriptedLoadableModule``) a Qt-free stand-in
with the same ``getParameterNode`` contract is used, so the Logic runs headless.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .process import CANCELLED, DONE, FAILED, ProcessRunner, RunStatus

try:  # inside the Slicer application
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # headless: slicer-core has MRML but no Qt

    class ScriptedLoadableModuleLogic:  # noqa: D101 - mirrors Slicer's class (Base/Python/slicer)
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            """The module's singleton ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene``."""
            import slicer

            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetName(scene.GenerateUniqueName(self.moduleName))
                node = scene.AddNode(node)
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node


@dataclass
class Run:
    """One background run of a ``ctsma`` subcommand."""

    label: str
    args: list[str]
    work_dir: Path
    out_dir: Path
    loader: Callable[["Run"], dict] | None
    runner: object
    started: float = field(default_factory=time.time)
    status: RunStatus | None = None
    outputs: dict = field(default_factory=dict)  # role -> node, filled when the run succeeds
    load_error: str = ""
    then: Callable[["Run"], "Run"] | None = None  # started when this run succeeds (e.g. dataset -> train)
    info: dict = field(default_factory=dict)  # what the Logic wants to remember about the run
    done_codes: tuple = (0,)  # exit codes after which the outputs are loaded (others: a failed run)
    inputs: list = field(default_factory=list)  # the scene nodes it reads: results load only while they are there

    @property
    def nodes(self) -> list:
        return [n for n in self.outputs.values() if n is not None]


class CliLogic(ScriptedLoadableModuleLogic):
    """Base of the module logics: start / poll / cancel one ``ctsma`` run at a time."""

    def __init__(self, runner_factory: Callable[[], object] | None = None, work_root: str | Path | None = None,
                 scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runnerFactory = runner_factory or self._defaultRunner
        self.workRoot = Path(work_root) if work_root else None
        self._scene = scene
        self.run: Run | None = None

    # -- environment ----------------------------------------------------------------------
    @staticmethod
    def _defaultRunner():
        """A runner whose child finds the ``ctsma`` package installed beside the modules."""
        here = Path(__file__).resolve().parent.parent  # the scripted-modules folder
        extra = [str(here)] if (here / "ctsma" / "__init__.py").exists() else []
        return ProcessRunner(pythonpath=extra)

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    def newWorkDir(self, label: str) -> Path:
        """A fresh folder for one run (under ``workRoot`` or the system temporary folder)."""
        from ctsma.errors import UserError

        root = self.workRoot or Path(tempfile.gettempdir()) / "CTSMA"
        try:
            root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=root))
        except OSError as exc:  # below a file, read-only, full disk: the user's choice of folder, not a defect
            raise UserError(f"cannot create a work folder in {root}: {exc.strerror or exc}; "
                            "choose another work folder") from None

    @contextmanager
    def preparing(self, label: str):
        """A fresh work folder for a run about to start (see :meth:`newWorkDir`), removed again, with the inputs
        exported into it, when anything fails before the run starts: a refused start leaves no patient data
        behind."""
        self._checkIdle()
        work = self.newWorkDir(label)
        self._inputWarnings = []  # what exporting the inputs warned of (segments left out), said again at the end
        try:
            yield work
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def checkInScene(self, node, what: str = "volume") -> None:
        """Refuse a node that is no longer in this logic's scene (removed, or left from a closed scene)."""
        from ctsma.errors import InputImageError

        if not self._inScene(node):
            raise InputImageError(f"{what} '{node.GetName()}' is no longer in the scene: select another")

    def _inScene(self, node) -> bool:
        return node.GetScene() is self.scene and bool(self.scene.IsNodePresent(node))

    def _checkIdle(self) -> None:
        from ctsma.errors import UserError

        if self.isRunning():
            raise UserError(f"'{self.run.label}' is still running: cancel it or wait until it ends")

    # -- runs -----------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.run is not None and (self.run.status is None or not self.run.status.finished)

    def startCli(self, label: str, args: list[str], work_dir: Path, out_dir: Path,
                 loader: Callable[[Run], dict] | None = None, env: dict[str, str] | None = None,
                 python: str | None = None, wrapper: Callable[[list], list] | None = None,
                 then: Callable[[Run], Run] | None = None, inputs: list | None = None,
                 done_codes: tuple = (0,)) -> Run:
        """Start ``ctsma <args>`` in the background; on success ``loader(run)`` puts the outputs in
        the scene and returns them as ``{role: node}``, then ``then(run)`` may start the next step.
        ``python`` and ``wrapper`` choose another interpreter and a command template. An exit code in
        ``done_codes`` other than 0 counts as success with a warning (its last error line)."""
        self._checkIdle()
        runner = self.runnerFactory()
        extra = {k: v for k, v in (("python", python), ("wrapper", wrapper)) if v}
        runner.start_ctsma(list(map(str, args)), work_dir, env=env, **extra)
        self.run = Run(label=label, args=list(map(str, args)), work_dir=Path(work_dir), out_dir=Path(out_dir),
                       loader=loader, runner=runner, then=then, inputs=list(inputs or []),
                       done_codes=tuple(done_codes))
        if getattr(self, "_inputWarnings", None):
            self.run.info["inputWarnings"], self._inputWarnings = list(self._inputWarnings), []
        return self.run

    def poll(self) -> RunStatus | None:
        """Non-blocking progress of the current run; loads its outputs once when it succeeds."""
        run = self.run
        if run is None:
            return None
        if run.status is not None and run.status.finished:
            return run.status
        status = run.runner.poll()
        if status.state == FAILED and status.returncode in run.done_codes:  # finished, with something to say
            status.state, status.warning, status.last_error = DONE, status.last_error, ""
        gone = [n for n in run.inputs if not self._inScene(n)]
        if status.state == DONE and run.loader is not None and gone:
            # the scene was closed or an input removed while the run went on: its results belong to no node here
            status.state = FAILED
            status.last_error = (f"'{gone[0].GetName()}' was removed from the scene while {run.label} ran: its "
                                 "results were not loaded")
            run.load_error = status.last_error
        elif status.state == DONE and run.loader is not None:
            try:
                run.outputs = dict(run.loader(run))
            except Exception as exc:  # noqa: BLE001 - reported to the user as a failed run
                status.state = FAILED
                status.last_error = f"could not load the results of {run.label}: {exc}"
                run.load_error = status.last_error
        if status.state == DONE and run.info.get("inputWarnings"):  # shown with the results, not only in the console
            status.warning = " ".join([status.warning, *run.info["inputWarnings"]]).strip()
        run.status = status
        if status.state == DONE and run.then is not None:
            try:
                run.then(run)  # the next step becomes the current run
            except Exception as exc:  # noqa: BLE001 - reported like a failed run
                status.state = FAILED
                status.last_error = f"could not start the step after {run.label}: {exc}"
                return status
            return self.poll()
        return status

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> RunStatus | None:
        """Block until the current run ends (batch use and tests)."""
        end = None if timeout is None else time.monotonic() + timeout
        status = self.poll()
        while status is not None and not status.finished and (end is None or time.monotonic() < end):
            time.sleep(interval)
            status = self.poll()
        return status

    def cancel(self) -> RunStatus | None:
        """Stop the current run; nothing it produced is added to the scene."""
        run = self.run
        if run is None or (run.status is not None and run.status.finished):
            return run.status if run else None
        run.status = run.runner.cancel()
        if run.status.state != CANCELLED:  # it ended on its own just before the cancel
            run.status = None
            return self.poll()
        return run.status

    def cleanupRun(self, keep_outputs: bool = False) -> None:
        """Delete the current run's work folder (unless ``keep_outputs``) and forget the run."""
        if self.run is None or self.isRunning():
            return
        if not keep_outputs:
            shutil.rmtree(self.run.work_dir, ignore_errors=True)
        self.run = None

    # -- helpers for subclasses ------------------------------------------------------------
    def exportVolume(self, node, path: Path, world: bool = True) -> Path:
        """Write a volume node (world geometry, LPS; with ``world`` False, its parent transform left out) for the
        command line to read."""
        from ctsma.io import write_image

        from .volumes import check_writable_geometry, volume_node_to_sitk

        image = volume_node_to_sitk(node, world=world)
        check_writable_geometry(image, node.GetName())
        return write_image(image, path, compress=False)

    def exportSegmentation(self, node, path: Path, reference_volume_node=None, kind: str | None = None) -> Path:
        """Write a segmentation node as a label image: CT-SMA's bone or ROI values, read from the segment names,
        for a ``kind`` (``"bones"``, ``"rois"``), else the segments' own label values."""
        from ctsma.errors import InputImageError
        from ctsma.io import write_image

        from .segmentations import segmentation_node_to_labelmap

        name = node.GetName() if hasattr(node, "GetName") else str(node)
        if not (hasattr(node, "IsA") and node.IsA("vtkMRMLSegmentationNode")):
            raise InputImageError(f"'{name}' is not a segmentation: select a segmentation node (a label map "
                                  "becomes one in the Data module: right-click, Convert labelmap to segmentation)")
        self.checkInScene(node, "segmentation")
        if node.GetSegmentation().GetNumberOfSegments() == 0:
            raise InputImageError(f"segmentation '{name}' has no segments: draw or load them first")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, _ = segmentation_node_to_labelmap(node, reference_volume_node, kind)
        for warning in caught:  # e.g. a misnamed segment left out: the user must see it when the run ends
            if isinstance(getattr(self, "_inputWarnings", None), list):
                self._inputWarnings.append(f"{str(warning.message).rstrip('.')}.")
            warnings.warn(warning.message, stacklevel=2)  # and the Python console, as before
        return write_image(image, path, compress=False)
