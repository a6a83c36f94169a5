"""Memory guard: estimate a stage's peak memory from the input's header and refuse it up front.

The whole-volume stages (morphometry's local-thickness maps, inference's full-size maps) hold several
arrays the size of the input at once. Rather than running out of memory half-way (and being killed by
the operating system with nothing written), they call :func:`check_memory` with the voxel count read
from the image header and their bytes-per-voxel factor; a run that would exceed the budget is refused
before any pixel is read, naming the estimate, the budget and how to change it.

The budget is ``CTSMA_MEMORY_GB`` (GB, read at call time) or, by default, 80 % of the memory this
machine has available now (the whole physical memory where that cannot be read).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MemoryBudgetError

# Peak bytes per input voxel (benchmarks/bench_memory_guard.py measures morphometry's); see docs/reliability.md.
BYTES_PER_VOXEL = {
    "morphometry": 128.0,  # measured ~100 B/voxel marginal (128^3 -> 192^3), plus margin
    "infer": 32.0,         # estimated from the arrays held (CT, labels, one full-size map at a time), not measured
}


def available_bytes() -> int:
    """Memory available to a new allocation now (``MemAvailable``), else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 1024 ** 3


def memory_budget_bytes() -> int:
    """The budget in bytes: ``CTSMA_MEMORY_GB`` if set, else 80 % of the available memory."""
    env = os.environ.get("CTSMA_MEMORY_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise MemoryBudgetError(f"CTSMA_MEMORY_GB must be a number of gigabytes, not {env!r}") from None
        if not gb > 0:
            raise MemoryBudgetError(f"CTSMA_MEMORY_GB must be positive, not {env!r}")
        return int(gb * 1e9)
    return int(0.8 * available_bytes())


def header_voxels(path: str | os.PathLike) -> int | None:
    """Voxel count from an image file's header (no pixels read); ``None`` where it cannot be told cheaply."""
    import numpy as np
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        return None  # DICOM folders and missing files: read_image reports those itself
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # read_image reports any problem in one line
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # a corrupt file: read_image gives the clear message
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    return int(np.prod(reader.GetSize(), dtype=np.int64))


def estimate_bytes(n_voxels: int, stage: str) -> int:
    """Estimated peak memory of ``stage`` (a key of :data:`BYTES_PER_VOXEL`) for ``n_voxels`` input voxels."""
    return int(n_voxels * BYTES_PER_VOXEL[stage])


def check_memory(n_voxels: int | None, stage: str, *, what: str = "image") -> int | None:
    """Raise :class:`MemoryBudgetError` if ``stage`` on ``n_voxels`` voxels would exceed the budget.

    Returns the estimate in bytes (``None`` when the voxel count is unknown).
    """
    if n_voxels is None:
        return None
    need = estimate_bytes(n_voxels, stage)
    budget = memory_budget_bytes()
    if need > budget:
        raise MemoryBudgetError(
            f"{stage} of {what} ({n_voxels:,} voxels) needs about {need / 1e9:.2f} GB, over the memory budget of "
            f"{budget / 1e9:.2f} GB (set CTSMA_MEMORY_GB to change it, or crop the image to the region of interest)")
    return need
