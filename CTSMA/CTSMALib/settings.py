"""Machine-level settings of the CT-SMA modules (kept across sessions, not with the scene).

Scene-level choices (volumes, model file, report folder...) live in the modules' parameter nodes
and are saved with the scene. What belongs to the *computer* is kept here: the compute device,
the Python that runs training, an optional cluster command template and the cache folder (sample
phantom, downloaded models).

:class:`MachineSettings` reads and writes a small key/value store. Inside Slicer that store is
``qt.QSettings()`` wrapped by :class:`QSettingsStore` (so the values land in Slicer's own
settings file under ``CTSMA/``); tests use a plain ``dict``. Every value is checked when it is
set, and a damaged stored value falls back to its default instead of breaking the module.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .parameters import DEVICES

PREFIX = "CTSMA/"
DEFAULTS = {"device": "auto", "trainingPython": "", "clusterTemplate": "", "cacheDir": "", "torchBackend": "auto"}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/CTSMA`` (``~/.cache/CTSMA``), or ``%LOCALAPPDATA%\\CTSMA`` on Windows."""
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "CTSMA"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "CTSMA"


def check_cluster_template(template: str) -> list[str]:
    """The template split into words; it must name ``{cmd}`` where the training command goes."""
    from ctsma.errors import ConfigError

    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise ConfigError(f"cluster command template cannot be split into words ({exc}): {template!r}") from None
    if not words or "{cmd}" not in template:
        raise ConfigError("a cluster command template must contain {cmd}, e.g. sbatch --wrap \"{cmd}\" "
                          "or ssh gpu-host {cmd}")
    return words


class QSettingsStore:
    """A ``qt.QSettings`` seen as a mapping of strings (Slicer application only)."""

    def __init__(self, qsettings=None):
        if qsettings is None:
            import qt

            qsettings = qt.QSettings()
        self.q = qsettings

    def __contains__(self, key: str) -> bool:
        return bool(self.q.contains(key))

    def __getitem__(self, key: str) -> str:
        if key not in self:
            raise KeyError(key)
        value = self.q.value(key)
        return "" if value is None else str(value)

    def __setitem__(self, key: str, value: str) -> None:
        self.q.setValue(key, value)

    def get(self, key: str, default=None):
        return self[key] if key in self else default


class MachineSettings:
    """Per-computer settings: ``device``, ``trainingPython``, ``clusterTemplate``, ``cacheDir``,
    ``torchBackend`` (the PyTorch build installed on first use: auto, cpu or cuXYZ)."""

    def __init__(self, store=None):
        self.store = {} if store is None else store

    # -- raw access --------------------------------------------------------------------------
    def _get(self, key: str) -> str:
        value = self.store.get(PREFIX + key, DEFAULTS[key])
        return DEFAULTS[key] if value is None else str(value)

    def _set(self, key: str, value: str) -> None:
        self.store[PREFIX + key] = str(value)

    # -- checked properties -------------------------------------------------------------------
    @property
    def device(self) -> str:
        value = self._get("device")
        return value if value in DEVICES else DEFAULTS["device"]

    @device.setter
    def device(self, value: str) -> None:
        from ctsma.errors import ConfigError

        if value not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} (got '{value}')")
        self._set("device", value)

    @property
    def trainingPython(self) -> str:
        """The Python executable that runs training; '' means Slicer's own Python."""
        return self._get("trainingPython")

    @trainingPython.setter
    def trainingPython(self, value: str) -> None:
        from ctsma.errors import ConfigError

        value = str(value or "").strip()
        if value and not (Path(value).is_file() and os.access(value, os.X_OK)):
            raise ConfigError(f"the training Python '{value}' is not an executable file: choose the python "
                              "executable of an environment where ctsma is installed")
        self._set("trainingPython", value)

    @property
    def clusterTemplate(self) -> str:
        """A command template such as ``sbatch --wrap "{cmd}"``; '' runs training on this computer."""
        value = self._get("clusterTemplate")
        try:
            return value if not value or check_cluster_template(value) else ""
        except Exception:  # noqa: BLE001 - a damaged stored value must not break the module
            return ""

    @clusterTemplate.setter
    def clusterTemplate(self, value: str) -> None:
        value = str(value or "").strip()
        if value:
            check_cluster_template(value)
        self._set("clusterTemplate", value)

    @property
    def cacheDir(self) -> Path:
        value = self._get("cacheDir")
        return Path(value) if value else default_cache_dir()

    @cacheDir.setter
    def cacheDir(self, value) -> None:
        from ctsma.errors import ConfigError

        value = str(value or "").strip()
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ConfigError(f"the cache folder '{value}' is a file, not a folder")
        self._set("cacheDir", value)

    @property
    def torchBackend(self) -> str:
        from .dependencies import torch_backend_argument

        value = self._get("torchBackend")
        try:
            torch_backend_argument(value)
            return value
        except Exception:  # noqa: BLE001 - a damaged stored value falls back to the default
            return DEFAULTS["torchBackend"]

    @torchBackend.setter
    def torchBackend(self, value: str) -> None:
        from .dependencies import torch_backend_argument

        torch_backend_argument(value)  # raises ConfigError on a bad value
        self._set("torchBackend", value)
