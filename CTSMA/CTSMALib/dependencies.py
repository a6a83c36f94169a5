"""Python packages the ``ctsma`` command line needs inside Slicer's Python.

The extension installs the ``ctsma`` package itself beside the modules; its third-party
dependencies are listed in ``CTSMA/Resources/requirements.txt`` (the ``pyproject.toml``
dependencies minus SimpleITK, which Slicer bundles, and torch, which the PyTorch extension
installs with the right CUDA build). ``Testing/test_module_ui.py`` keeps the two lists equal.

On first use :func:`plan_installation` finds what is missing or too old (pure Python, tested
headless); :func:`ensureDependencies` shows that plan and installs only after the user confirms:

- torch through the PyTorch extension's installer (``PyTorchUtilsLogic().installTorch``), with
  the compute backend chosen by the user: ``auto`` (light-the-torch picks the CUDA build the
  driver supports, else CPU), ``cpu``, or an explicit CUDA build such as ``cu121``;
- the rest with pip, with a constraint that pins Slicer's own SimpleITK to the installed version,
  so no dependency can replace it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
PROVIDED_BY_SLICER = {"simpleitk": "bundled with Slicer", "torch": "installed by the PyTorch extension"}
TORCH_REQUIREMENT = ">=2.2"


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _satisfied(requirement: str, version: str | None) -> bool:
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement

        return Requirement(requirement).specifier.contains(version, prereleases=True)
    except Exception:  # noqa: BLE001 - no 'packaging' or an odd version string: presence is enough
        return True


@dataclass
class InstallPlan:
    """What must be installed before the modules can run."""

    pip: list[str] = field(default_factory=list)  # requirement strings for pip
    torch: bool = False  # torch missing or too old: the PyTorch extension installs it
    keep: dict[str, str] = field(default_factory=dict)  # Slicer's own packages, pinned: name -> version

    @property
    def empty(self) -> bool:
        return not self.pip and not self.torch

    def constraints(self) -> str:
        """pip constraints that forbid replacing Slicer's own packages (e.g. SimpleITK==2.4.1)."""
        return "".join(f"{name}=={version}\n" for name, version in sorted(self.keep.items()))

    def describe(self, requester: str = "CT-SMA", backend: str = "auto") -> str:
        lines = [f"{requester} needs these Python packages in Slicer's Python:"]
        if self.torch:
            build = {"auto": "the CUDA build your driver supports, else CPU", "cpu": "CPU only"}.get(backend, backend)
            lines.append(f"  - torch {TORCH_REQUIREMENT} (through the PyTorch extension; {build})")
        lines += [f"  - {r}" for r in self.pip]
        if self.keep:
            lines.append("Slicer's own " + ", ".join(sorted(self.keep)) + " is kept as it is.")
        return "\n".join(lines) + "\nInstall them now? This can take a few minutes."


def plan_installation(requirements: list[str] | None = None,
                      version_of: Callable[[str], str | None] = installed_version) -> InstallPlan:
    """Compare the requirements with what ``version_of(name)`` says is installed."""
    requirements = requirement_lines() if requirements is None else requirements
    plan = InstallPlan()
    for name in ("simpleitk",):
        version = version_of("SimpleITK") or version_of(name)
        if version:
            plan.keep["SimpleITK"] = version
    plan.torch = not _satisfied("torch" + TORCH_REQUIREMENT, version_of("torch"))
    for req in requirements:
        name = requirement_name(req)
        if name in PROVIDED_BY_SLICER:
            continue  # never installed by pip here
        if not _satisfied(req, version_of(name)):
            plan.pip.append(req)
    return plan


def torch_backend_argument(backend: str) -> str | None:
    """``forceComputationBackend`` for ``installTorch``: None lets light-the-torch choose."""
    from ctsma.errors import ConfigError

    if backend == "auto":
        return None
    if backend == "cpu" or re.fullmatch(r"cu\d{3}", backend or ""):
        return backend
    raise ConfigError(f"torch build must be auto, cpu or a CUDA build such as cu121 (got '{backend}')")


def ensureDependencies(requester: str = "CT-SMA", backend: str = "auto", plan: InstallPlan | None = None) -> None:
    """Inside Slicer: install what is missing after the user confirms (raises if they decline)."""
    import tempfile

    import slicer

    plan = plan or plan_installation()
    if plan.empty:
        return
    if not slicer.util.confirmOkCancelDisplay(plan.describe(requester, backend), windowTitle=requester):
        raise RuntimeError("the required Python packages were not installed (installation declined)")
    if plan.torch:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise RuntimeError("CT-SMA needs the PyTorch extension: install it from the Extensions Manager "
                               "and restart Slicer") from exc
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, forceComputationBackend=torch_backend_argument(backend),
            torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError("PyTorch is required and was not installed")
    if plan.pip:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write(plan.constraints())
        args = plan.pip + ["-c", fh.name]
        try:
            with slicer.util.displayPythonShell() if hasattr(slicer.util, "displayPythonShell") else _nothing():
                try:  # Slicer >= 5.10: uv with Slicer's core constraints; the user has already agreed
                    import slicer.packaging

                    slicer.packaging.pip_install(args, interactive=False)
                except ImportError:  # older Slicer
                    slicer.util.pip_install(args)  # progress shows in the Python console
        finally:
            Path(fh.name).unlink(missing_ok=True)
    still = plan_installation()
    if still.pip:
        raise RuntimeError("these packages could not be installed: " + ", ".join(still.pip) +
                           " (see the Python console; docs/slicer.md, Troubleshooting)")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
