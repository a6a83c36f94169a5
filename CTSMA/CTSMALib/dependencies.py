"""Python packages the ``ctsma`` command line needs inside Slicer's Python.

The extension installs the ``ctsma`` package itself beside the modules; its third-party
dependencies are listed in ``CTSMA/Resources/requirements.txt`` (the ``pyproject.toml``
dependencies minus SimpleITK, which Slicer bundles, and torch, which the PyTorch extension
installs with the right CUDA build). ``Testing/test_module_ui.py`` keeps the two lists equal.
"""

from __future__ import annotations

from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
PROVIDED_BY_SLICER = {"simpleitk": "bundled with Slicer", "torch": "installed by the PyTorch extension"}


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def ensureDependencies(requester: str = "CT-SMA") -> None:
    """Inside Slicer: install what is missing, asking the user first (raises if they decline)."""
    import slicer

    try:
        import torch  # noqa: F401
    except ImportError:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise RuntimeError("CT-SMA needs the PyTorch extension: install it from the Extensions Manager "
                               "and restart Slicer") from exc
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.2") is None:
            raise RuntimeError("PyTorch is required and was not installed")
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(packaging.load_requirements(REQUIREMENTS), requester=requester)
    else:  # Slicer < 5.10: no slicer.packaging
        missing = [r for r in requirement_lines() if not _installed(r)]
        if missing and slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages:\n" + "\n".join(missing) + "\nInstall them now?"):
            slicer.util.pip_install(missing)
        elif missing:
            raise RuntimeError("the required Python packages were not installed")


def _installed(requirement: str) -> bool:
    import re
    from importlib import metadata

    name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
