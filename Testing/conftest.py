"""Shared test set-up: the Slicer module folders on ``sys.path`` and a headless MRML scene.

``mrml_scene`` gives a real ``vtkMRMLScene`` with the application logic and the Volumes,
Segmentations, SubjectHierarchy, Transforms, Tables and Colors logics registered, and
``slicer.mrmlScene`` / ``slicer.modules.<name>.logic()`` set, as the Slicer application does
(see ``CTSMA/CTSMALib/headless.py``). Tests using it are skipped only where the
``slicer-core`` wheel is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import os

import pytest
from hypothesis import settings as _hyp_settings

# The fuzz tests are derandomised by default, so a CI run is repeatable; ``CTSMA_FUZZ=deep`` draws new random
# examples on each run, to go looking for failures (a case found that way is then pinned as a plain test).
_hyp_settings.register_profile("ci", derandomize=True)
_hyp_settings.register_profile("deep", derandomize=False)
_hyp_settings.load_profile("deep" if os.environ.get("CTSMA_FUZZ") == "deep" else "ci")

REPO = Path(__file__).resolve().parent.parent
for _module_dir in ("CTSMA", "CTSMARegistration"):
    _p = str(REPO / _module_dir)
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.fixture(autouse=True)
def _progress_settings():
    """An in-process ``main(["--quiet", ...])`` or ``--progress-jsonl`` sets module globals of ``ctsma.progress``,
    in a test or in a module's fixture: each test starts from the defaults (after the fixtures of wider scope), so
    that none runs silenced or writes into another test's file."""
    from ctsma import progress

    progress.configure(jsonl_path=os.environ.get("CTSMA_PROGRESS_JSONL", ""), quiet=False)
    yield


def _require_slicer_core():
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (MRML libraries)")
    if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package 'slicer' has the same name
        pytest.skip("the installed 'slicer' is not slicer-core")
    return slicer


@pytest.fixture
def headless_slicer(tmp_path):
    """A :class:`CTSMALib.headless.HeadlessSlicer` (scene, app logic, module logics)."""
    _require_slicer_core()
    from CTSMALib.headless import HeadlessSlicer

    with HeadlessSlicer(cache_dir=tmp_path / "mrml-cache") as h:
        yield h


@pytest.fixture
def mrml_scene(headless_slicer):
    """A real ``vtkMRMLScene`` set up as in the Slicer application."""
    return headless_slicer.scene
