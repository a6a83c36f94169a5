"""A real MRML scene without the Slicer application (``slicer-core`` wheel).

The Slicer application builds an application logic, registers the module logics and
publishes ``slicer.mrmlScene`` and ``slicer.modules``. Module logic that expects those
globals can then run in pytest, in benchmarks and in batch scripts.
Facts this relies on are in ``shared/notes/slicer-core.md`` (checked with slicer-core 5.13):

- a Python reference to the application logic must be kept, or ``scene.Clear`` loses the
  default colour tables;
- the Colors logic needs ``AddDefaultColorNodes`` and must be registered, or the Volumes logic
  complains;
- ``SetSliceLogics``/``SetViewLogics`` need (empty) collections;
- ``scene.ReadFromMRB`` needs a remote-IO logic with a cache folder and a data-IO manager logic.

Inside the Slicer application none of this is needed: ``HeadlessSlicer`` refuses to replace a
real application's scene.
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path

#: Module logics registered like the application does (name -> class name in ``slicer``).
MODULE_LOGICS = {
    "Colors": "vtkSlicerColorLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Transforms": "vtkSlicerTransformLogic",
    "Tables": "vtkSlicerTablesLogic",
}


class _ModuleNamespace:
    """Stands in for ``slicer.modules.<name>``: only ``logic()`` is provided."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class HeadlessSlicer:
    """A ``vtkMRMLScene`` with the application logic and module logics registered.

    Use as a context manager, or call :meth:`close`. While open, ``slicer.mrmlScene`` is the
    scene and ``slicer.modules.<lower-case name>.logic()`` returns the module logic, as in Slicer.
    """

    def __init__(self, cache_dir: str | Path | None = None, install_globals: bool = True):
        import slicer
        import vtk

        self._slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ctsma-mrml-")
            cache_dir = self._tmp.name
            # our own throw-away folder: mark it as a cache that the cache manager may clean (else it warns)
            (Path(cache_dir) / ".slicer-cache").touch()
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

        # The application logic must outlive every use of the scene: keep the reference here.
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.SetHomeDirectory(str(self.cache_dir))
        self.app_logic.SetTemporaryPath(str(self.cache_dir))
        # Colour files are looked up in <home>/<share>/ColorFiles; an empty one keeps the log quiet.
        (self.cache_dir / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.app_logic.SetShareDirectory("share")
        self._slice_logics = vtk.vtkCollection()
        self._view_logics = vtk.vtkCollection()
        self.app_logic.SetSliceLogics(self._slice_logics)
        self.app_logic.SetViewLogics(self._view_logics)

        self.logics = {}
        for name, class_name in MODULE_LOGICS.items():
            logic = getattr(slicer, class_name)()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        colors = self.logics["Colors"]
        self.app_logic.SetColorLogic(colors)
        if self.scene.GetFirstNodeByName("Grey") is None:
            colors.AddDefaultColorNodes()

        # Reading .mrb files goes through the data-IO manager and the remote-IO cache.
        self.remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.remote_io.SetMRMLScene(self.scene)
        self.remote_io.GetCacheManager().SetRemoteCacheDirectory(str(self.cache_dir))
        self.data_io_logic = slicer.vtkDataIOManagerLogic()
        self.data_io_logic.SetMRMLApplicationLogic(self.app_logic)
        self.data_io_logic.SetAndObserveDataIOManager(self.remote_io.GetDataIOManager())
        self.scene.SetCacheManager(self.remote_io.GetCacheManager())
        self.scene.SetDataIOManager(self.remote_io.GetDataIOManager())

        self._saved_globals = None
        if install_globals:
            self._install_globals()

    def _install_globals(self) -> None:
        slicer = self._slicer
        if getattr(slicer, "app", None) is not None:
            raise RuntimeError("HeadlessSlicer is for use outside the Slicer application")
        self._saved_globals = {k: getattr(slicer, k, None) for k in ("mrmlScene", "modules")}
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            **{name.lower(): _ModuleNamespace(logic) for name, logic in self.logics.items()})

    def logic(self, name: str):
        """The registered module logic called ``name`` (e.g. ``"Segmentations"``)."""
        return self.logics[name]

    def close(self) -> None:
        """Clear the scene, restore the ``slicer`` globals and remove the cache folder."""
        if self.scene is None:
            return
        self.scene.Clear(1)
        if self._saved_globals is not None:
            for key, value in self._saved_globals.items():
                if value is None:
                    if hasattr(self._slicer, key):
                        delattr(self._slicer, key)
                else:
                    setattr(self._slicer, key, value)
            self._saved_globals = None
        for name, logic in self.logics.items():
            if name != "Segmentations":  # it looks up the subject hierarchy of the new scene and warns on None;
                logic.SetMRMLScene(None)  # it is released with this object, the scene being cleared already
        self.data_io_logic.SetAndObserveDataIOManager(None)
        self.remote_io.SetMRMLScene(None)
        self.app_logic.SetMRMLScene(None)
        self.scene = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "HeadlessSlicer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
