"""Memory guard: estimate a stage's peak memory from the input's header; chunk, or refuse, up front.

The whole-volume stages (morphometry's local-thickness maps, inference's full-size maps) hold several
arrays the size of the input at once. Rather than running out of memory half-way (and being killed by
the operating system with nothing written), they call :func:`plan_memory` with the voxel count read
from the image header. When the whole-volume estimate (voxels x :data:`BYTES_PER_VOXEL`) fits the
budget the stage runs as before; when it does not, the stage processes the volume in z-slabs (the arrays
it still holds for the whole input are :data:`RESIDENT_BYTES_PER_VOXEL`, each slab costs
:data:`SLAB_BYTES_PER_VOXEL` per slab voxel) and streams its maps to disk (:func:`streamed_nifti`). Only
when even the smallest useful slab would not fit is the run refused, before any pixel is read, naming the
estimate, the budget and how to change it.

The budget is ``CTSMA_MEMORY_GB`` (GB, read at call time) or, by default, 80 % of the memory this
machine has available now (the whole physical memory where that cannot be read).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MemoryBudgetError

# Peak bytes per input voxel (benchmarks/bench_memory_guard.py measures morphometry's); see docs/reliability.md.
BYTES_PER_VOXEL = {
    "morphometry": 128.0,  # measured ~100 B/voxel marginal (128^3 -> 192^3), plus margin
    "infer": 32.0,         # measured ~21 B/voxel (benchmarks/bench_memory_guard.py), plus margin
}
# Chunked (z-slab) processing, used when the whole-volume estimate is over the budget (bytes per input voxel):
# PREPARE is the peak before the slabs start (reading, binarising, segmenting: not chunked), RESIDENT what stays
# held for the whole input while the slabs run. SLAB is the work per slab voxel. The morphometry slab cost is
# finer grained (ctsma.morphometry.slabs: per slab voxel, per core voxel, per distance-only plane voxel).
# See docs/reliability.md for the measurements behind them.
PREPARE_BYTES_PER_VOXEL = {
    "morphometry": 16.0,   # image (float32), a sorted copy for the 0/1 check, ROI and binary image; see cli
    "infer": 16.0,         # measured ~13 B/voxel: CT, label images, the segmentation on its coarse grid
}
RESIDENT_BYTES_PER_VOXEL = {
    "morphometry": 6.0,    # binary image and ROI (bool), the thickness values read back for the statistics
    "infer": 4.0,          # bone and ROI label images and the ROI array (the CT's pixels are released)
}
SLAB_BYTES_PER_VOXEL = {
    "morphometry": 96.0,   # a slab without halo (32 per slab voxel + 64 per core voxel, measured 86)
    "infer": 80.0,         # blended value and uncertainty maps of a slab of the ROI box, its full-width planes
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


def header_size(path: str | os.PathLike) -> tuple[int, ...] | None:
    """Image size (x, y, z) from a file's header (no pixels read); ``None`` where it cannot be told cheaply."""
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
    return tuple(int(v) for v in reader.GetSize())


def plane_voxels(size_xyz) -> int:
    """Voxels of one z-plane (x * y) of an image of ``size_xyz`` (a 2D size counts as one plane)."""
    size = tuple(size_xyz)
    return int(size[0]) * int(size[1] if len(size) > 1 else 1)


def estimate_bytes(n_voxels: int, stage: str) -> int:
    """Estimated peak memory of ``stage`` (a key of :data:`BYTES_PER_VOXEL`) for ``n_voxels`` input voxels."""
    return int(n_voxels * BYTES_PER_VOXEL[stage])


@dataclass(frozen=True)
class MemoryPlan:
    """How a stage runs: on the whole volume, or in z-slabs with ``slab_budget`` bytes for each slab's work."""

    stage: str
    n_voxels: int | None
    budget: int
    need: int | None          # whole-volume estimate
    chunked: bool = False
    resident: int = 0         # bytes held for the whole input while the slabs run
    min_need: int | None = None  # max(preparation, resident + the smallest useful slab)

    @property
    def slab_budget(self) -> int:
        """Bytes left for one slab's work in a chunked run."""
        return max(0, self.budget - self.resident)

    def slab_notice(self, what: str, how: str) -> str:
        """The status line of a chunked run: ``what`` needs this much at once, so it runs ``how``."""
        return (f"{what} needs about {gb(self.need)} GB at once, over the memory budget of {gb(self.budget)} GB: "
                f"{how}")


def gb(n_bytes: float) -> str:
    """Bytes as GB for messages: two decimals, four below 0.1 GB (so small budgets do not all read 0.00)."""
    return f"{n_bytes / 1e9:.2f}" if n_bytes >= 1e8 else f"{n_bytes / 1e9:.4f}"


def budget_message(stage: str, what: str, n_voxels: int, need: int, budget: int, how: str = "") -> str:
    """The one-line refusal (it names ``CTSMA_MEMORY_GB``); ``how`` says how the estimate was made."""
    how = f", {how}" if how else ""
    return (f"{stage} of {what} ({n_voxels:,} voxels{how}) needs about {gb(need)} GB, over the memory budget "
            f"of {gb(budget)} GB (set CTSMA_MEMORY_GB to change it, or crop the image to the region of interest)")


def plan_memory(n_voxels: int | None, stage: str, *, what: str = "image", min_slab_bytes: int = 0,
                prepare_per_voxel: float | None = None, resident_per_voxel: float | None = None,
                extra_whole_per_voxel: float = 0.0) -> MemoryPlan:
    """Decide, from the header's voxel count, whether ``stage`` runs whole or in z-slabs; refuse if neither fits.

    ``min_slab_bytes`` is the cost of the smallest useful slab (the caller knows its plane size and halo);
    ``prepare_per_voxel`` and ``resident_per_voxel`` override :data:`PREPARE_BYTES_PER_VOXEL` and
    :data:`RESIDENT_BYTES_PER_VOXEL` (e.g. a heavier binarisation); ``extra_whole_per_voxel`` adds to the whole-image
    estimate what only a whole-image run computes (morphometry's SMI and DA). Raises :class:`MemoryBudgetError` when even
    the preparation, or the resident arrays plus that slab, exceed the budget.
    """
    budget = memory_budget_bytes()
    if n_voxels is None:
        return MemoryPlan(stage, None, budget, None)
    need = estimate_bytes(n_voxels, stage) + int(n_voxels * extra_whole_per_voxel)
    if need <= budget:
        return MemoryPlan(stage, n_voxels, budget, need)
    prep = PREPARE_BYTES_PER_VOXEL[stage] if prepare_per_voxel is None else float(prepare_per_voxel)
    per = RESIDENT_BYTES_PER_VOXEL[stage] if resident_per_voxel is None else float(resident_per_voxel)
    resident = int(n_voxels * per)
    min_need = max(int(n_voxels * prep), resident + int(min_slab_bytes))
    if min_need > budget:
        raise MemoryBudgetError(budget_message(stage, what, n_voxels, min_need, budget,
                                               "processed in z-slabs of the smallest useful size"))
    return MemoryPlan(stage, n_voxels, budget, need, True, resident, min_need)


# -- streamed output -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """The grid of an image (ITK order: size and spacing x, y, z); stands in for a SimpleITK image whose
    pixels have been released."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, img) -> "Geometry":
        return cls(tuple(int(v) for v in img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                   tuple(img.GetDirection()))

    def GetSize(self):  # noqa: N802 - the SimpleITK names, so either can be passed
        return self.size

    def GetSpacing(self):  # noqa: N802
        return self.spacing

    def GetOrigin(self):  # noqa: N802
        return self.origin

    def GetDirection(self):  # noqa: N802
        return self.direction


def _nifti_header(geom: Geometry) -> bytes:
    """The 352-byte NIfTI-1 header SimpleITK writes for a float32 image of this geometry.

    Made by writing a 1x1x1 image of the same spacing, origin and direction and setting the three sizes:
    nothing else in ITK's header depends on the size (the suite checks it byte for byte).
    """
    import SimpleITK as sitk

    im = sitk.Image([1, 1, 1], sitk.sitkFloat32)
    im.SetSpacing(geom.spacing)
    im.SetOrigin(geom.origin)
    im.SetDirection(geom.direction)
    with tempfile.TemporaryDirectory(prefix="ctsma-hdr-") as d:
        sitk.WriteImage(im, os.path.join(d, "h.nii"), False)
        with open(os.path.join(d, "h.nii"), "rb") as fh:
            hdr = bytearray(fh.read(352))
    dims = struct.unpack_from("<8h", hdr, 40)
    if struct.unpack_from("<i", hdr, 0)[0] != 348 or dims[0] != 3 or struct.unpack_from("<f", hdr, 108)[0] != 352.0:
        raise RuntimeError("unexpected NIfTI header from ITK; cannot stream this image")  # pragma: no cover
    if max(geom.size) > 32767:
        from ..errors import InputImageError
        raise InputImageError(f"an image of size {geom.size} cannot be stored as NIfTI-1 (at most 32767 per axis)")
    struct.pack_into("<3h", hdr, 42, *geom.size)
    return bytes(hdr)


class NiftiPlanes:
    """A float32 NIfTI image being written plane block by plane block, in z order (see :func:`streamed_nifti`)."""

    def __init__(self, fh, geom: Geometry):
        self._fh, self.geom = fh, geom
        self.shape_zyx = tuple(geom.size[::-1])
        self.done = 0  # planes written

    def write(self, block) -> None:
        """Append planes: a (k, y, x) array, or a (y, x) plane."""
        import numpy as np
        b = np.asarray(block, dtype="<f4")
        if b.ndim == 2:
            b = b[None]
        if b.shape[1:] != self.shape_zyx[1:] or self.done + b.shape[0] > self.shape_zyx[0]:
            raise ValueError(f"planes of shape {b.shape} do not continue an image of shape {self.shape_zyx} "
                             f"after {self.done} planes")
        self._fh.write(memoryview(np.ascontiguousarray(b)).cast("B"))
        self.done += b.shape[0]

    def write_zeros(self, upto: int) -> None:
        """Append planes of zeros until ``upto`` planes are written."""
        import numpy as np
        plane = np.zeros(self.shape_zyx[1:], "<f4")
        while self.done < upto:
            self.write(plane)

    def finish(self) -> None:
        if self.done != self.shape_zyx[0]:
            raise RuntimeError(f"streamed image has {self.done} of {self.shape_zyx[0]} planes")


@contextlib.contextmanager
def streamed_nifti(path: str | os.PathLike, geom: Geometry, *, level: int = 1):
    """Write a float32 ``.nii.gz`` in ``geom``'s grid plane by plane, atomically; yields a :class:`NiftiPlanes`.

    Reads back exactly as the same array written whole with ``write_image`` (same header bytes; only the gzip
    stream differs). Missing planes at the end raise; on any error the partial file is removed.
    """
    from .atomic import atomic_path

    header = _nifti_header(geom)
    with atomic_path(path) as tmp:
        with gzip.open(tmp, "wb", compresslevel=max(1, min(9, int(level) if level >= 0 else 6))) as fh:
            fh.write(header)
            planes = NiftiPlanes(fh, geom)
            yield planes
            planes.finish()
