"""GUI helpers shared by the module widgets (Slicer application only).

Qt is imported inside the functions, never at import time, so importing this file headless is
harmless; nothing here runs without the application.
"""

from __future__ import annotations

from .process import CANCELLED, DONE, FAILED

POLL_MS = 250


class RunMonitor:
    """Follows the Logic's background run from the GUI.

    While a run is going, the button that started it reads "Cancel" (and cancels when
    clicked), the other action buttons are disabled, and a ``QTimer`` polls the Logic to move
    the progress bar and the stage label. ``onFinished(status, run)`` is called once at the end.
    """

    def __init__(self, logic, progressBar, stageLabel, actionButtons, onFinished, onPoll=None):
        import qt

        self.onPoll = onPoll  # called with every status (live details such as training epochs)
        self.logic = logic
        self.progressBar = progressBar
        self.stageLabel = stageLabel
        self.actionButtons = list(actionButtons)
        self.onFinished = onFinished
        self.activeButton = None
        self._idleText = {}
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.poll)

    def isBusy(self) -> bool:
        return self.activeButton is not None

    def begin(self, button) -> None:
        """Call right after the Logic started a run from ``button``."""
        self.activeButton = button
        self._idleText = {b: b.text for b in self.actionButtons}
        for b in self.actionButtons:
            b.enabled = b is button
        button.text = "Cancel"
        self.progressBar.visible = True
        self.progressBar.setRange(0, 0)  # busy until the first progress line
        self.stageLabel.text = "Starting..."
        self.timer.start()

    def cancel(self) -> None:
        self.stageLabel.text = "Cancelling..."
        self.logic.cancel()
        self.poll()

    def poll(self) -> None:
        status = self.logic.poll()
        if status is None:
            return
        if status.fraction is not None:
            self.progressBar.setRange(0, 100)
            self.progressBar.value = int(round(100 * status.fraction))
        if status.stage:
            self.stageLabel.text = f"{status.stage}: {status.message}" if status.message else status.stage
        if self.onPoll is not None:
            self.onPoll(status)
        if status.finished:
            self._end(status)

    def _end(self, status) -> None:
        self.timer.stop()
        for b in self.actionButtons:
            b.text = self._idleText.get(b, b.text)
            b.enabled = True
        self.activeButton = None
        self.progressBar.visible = False
        run = self.logic.run
        label = run.label if run else "run"
        self.stageLabel.text = {DONE: f"{label} finished.", CANCELLED: f"{label} cancelled.",
                                FAILED: f"{label} failed: {status.last_error}"}.get(status.state, status.state)
        self.onFinished(status, run)

    def stop(self) -> None:
        """On module cleanup: stop polling and cancel a run still going."""
        self.timer.stop()
        if self.logic.isRunning():
            self.logic.cancel()


def bindMachineSettings(ui, settings, torchBuilds) -> None:
    """Show the machine settings (``settings``: :class:`~CTSMALib.settings.MachineSettings`) in their widgets and
    save each change the user makes; a refused value shows why. The device box is also bound to the parameter
    node, whose ``connectGui`` clears and refills it: only the user's own choice (``activated``) is saved, so those
    programmatic changes neither pop up an error nor overwrite the saved device."""
    import slicer

    def save(key, value):
        with slicer.util.tryWithErrorDisplay("Setting not saved: " + key):
            setattr(settings, key, value)

    ui.torchBackendComboBox.addItems(torchBuilds)
    ui.torchBackendComboBox.currentText = settings.torchBackend
    ui.trainingPythonLineEdit.currentPath = settings.trainingPython
    ui.clusterTemplateLineEdit.text = settings.clusterTemplate
    ui.cacheDirButton.directory = str(settings.cacheDir)
    for widget, signal, key in ((ui.trainingPythonLineEdit, "currentPathChanged(QString)", "trainingPython"),
                                (ui.cacheDirButton, "directoryChanged(QString)", "cacheDir"),
                                (ui.torchBackendComboBox, "currentTextChanged(QString)", "torchBackend")):
        widget.connect(signal, lambda value, k=key: save(k, value))
    ui.deviceComboBox.connect("activated(int)", lambda i: save("device", ui.deviceComboBox.itemText(i)))
    ui.clusterTemplateLineEdit.connect("editingFinished()",
                                       lambda: save("clusterTemplate", ui.clusterTemplateLineEdit.text))


def showFailure(status) -> None:
    import slicer

    if status.state == FAILED:
        slicer.util.errorDisplay(status.last_error or "The run failed; see the log in its work folder.")
    elif getattr(status, "warning", ""):
        slicer.util.warningDisplay(status.warning)


def reloadLib() -> None:
    """Reload every ``CTSMALib`` submodule (developer "Reload" button: Slicer reloads only the
    module file itself)."""
    import importlib
    import sys

    for name in sorted(n for n in list(sys.modules) if n.startswith("CTSMALib.")):
        importlib.reload(sys.modules[name])
