"""Morphometry of a volume over the memory budget, in z-slabs with an exact halo.

:func:`measure_in_slabs` returns the same parameters as :func:`~.parameters.measure_binary` while holding only
the binary image, the ROI and one slab's work in memory; the thickness maps go slab by slab to a sink (a
streamed NIfTI file, see :func:`ctsma.io.memory.streamed_nifti`, or arrays).

Why the local thickness of a slab's core is exact (the same float32 values as on the whole image)
-----------------------------------------------------------------------------------------------------
Let ``R`` be the largest distance (mm) from a voxel of the phase to the nearest voxel centre outside it,
``k = ceil(R / dz) + 1`` planes, and ``C`` the core planes of a slab.

* **Distances.** A voxel's nearest outside voxel is at most ``R`` away, so at most ``k - 1`` planes away: the
  distance transform of the planes ``[C - h - k, C + h + k]`` is exact on ``[C - h, C + h]`` (a voxel there
  sees every candidate it has in the whole image). :func:`max_distance` finds ``R`` exactly in a first, cheap
  pass: the distance of a slab is never below the true one, and equals it wherever it does not exceed the
  distance to the first plane outside the slab; a slab whose core is not certified so is redone with twice the
  halo.
* **Exact method.** A core voxel ``v`` takes the largest value of the ridge spheres containing it; their centres
  lie less than ``R`` from ``v`` (within ``k - 1`` planes of the core), and whether a voxel is a ridge centre,
  and its value, depend on its 26-neighbourhood only. With the halo ``h = k + 1`` all of these read exact
  distances, so the same spheres with the same values reach the core; spheres centred elsewhere in the slab
  have their true radius (at most ``R``) and cannot reach it. The containment table is sized by the whole
  image's largest distance, as in a whole-image run.
* **Fast method** (reduced medial axis). A sphere is painted when it owns a voxel of the power diagram;
  an owned voxel lies inside the sphere (less than ``R`` from its centre), and every sphere competing for it
  contains it as well. So a sphere that can reach the core is decided by the distances within ``3 R`` of the
  core: ``h = 3 k``. The power diagram's z pass is told the slab's first plane in the image, so it does the
  whole image's floating-point arithmetic and breaks ties identically.
* The in-plane crop of every slab is the whole-image run's crop (the ROI's bounding box), so the x and y
  passes see the same arrays.
* Only the core is painted, by the spheres whose open ball meets it; a voxel takes the first sphere in the
  same value order, so the block structure of the painter does not matter.

The suite checks the claim bit for bit (``Testing/test_morphometry_slabs.py``). Each phase (bone, marrow) has
its own ``R`` and halo and is processed separately.

The other parameters
--------------------
* BV/TV, Tb.Th, Tb.Sp: voxel counts and the thickness values of the core voxels, appended in the whole image's
  C order to a temporary float32 file; the mean and the histogram are computed from it by the same numpy
  calls as on the whole image (identical); the SD is accumulated block by block around that mean (float64,
  equal to about 1e-15 relative).
* BS/BV: marching-cubes surface area is a sum over 2x2x2 cells of the padded volume; slabs sharing one plane
  partition the cells, so no triangle is counted twice or missed (equal to float rounding, ~1e-15 relative).
* Conn.D: the Euler characteristic of the closed voxel cubes (26-connected bone) satisfies
  ``chi(A u B) = chi(A) + chi(B) - chi(A n B)``; two slabs sharing one plane intersect exactly in that plane's
  cubes, so ``chi = sum chi(slab) - sum chi(shared plane)``: an exact integer identity.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Callable

import numpy as np

from .thickness import _scaled, _thickness_from_dsq, distance_sq, unit_spacing

# Memory of one slab (bytes per voxel), fitted on 128^3 Gaussian-field bone images (28-40 B per slab voxel with
# halos, 86 B/voxel for the whole image in one slab); benchmarks/bench_memory_guard.py checks that a z-slab run
# stays under its budget. Every slab voxel (halo included) holds the distances and the power labels or ridge
# values (SLAB_BYTES); a core voxel also holds its painted spheres and map (CORE_BYTES); the planes read only
# for the distance transform cost EDT_BYTES.
SLAB_BYTES = 32.0
CORE_BYTES = 64.0
EDT_BYTES = 16.0
SURFACE_BYTES = 64.0  # per voxel of a marching-cubes / Euler slab


class SlabMemoryError(Exception):
    """Even a slab of one core plane plus its halo does not fit the slab budget (``planes`` it would need)."""

    def __init__(self, phase: str, planes: int, need: float, distance_mm: float):
        super().__init__(phase, planes, need, distance_mm)
        self.phase, self.planes, self.need, self.distance_mm = phase, planes, need, distance_mm


class Phase:
    """Bone or marrow of the region that the spheres are fitted in, read plane range by plane range."""

    def __init__(self, name: str, bone: np.ndarray, roi: np.ndarray, region, spheres: str):
        self.name, self.bone, self.roi, self.spheres = name, bone, roi, spheres
        self.zs, self.ys, self.xs = region
        self.nz = self.zs.stop - self.zs.start
        self.plane_voxels = (self.ys.stop - self.ys.start) * (self.xs.stop - self.xs.start)
        self.all_phase = False

    def _read(self, lo, hi):
        z = slice(self.zs.start + lo, self.zs.start + hi)
        return self.bone[z, self.ys, self.xs], self.roi[z, self.ys, self.xs]

    def planes(self, lo: int, hi: int) -> np.ndarray:
        """The phase on region planes ``lo:hi`` (the spheres are confined to it)."""
        b, r = self._read(lo, hi)
        if self.spheres == "roi":
            return b & r if self.name == "bone" else r & ~b
        return b.copy() if self.name == "bone" else ~b

    def stat(self, lo: int, hi: int) -> np.ndarray:
        """The voxels whose values enter the statistics: this phase inside the ROI."""
        b, r = self._read(lo, hi)
        return b & r if self.name == "bone" else r & ~b

    def count(self) -> int:
        n = 0
        for lo in range(0, self.nz, 64):
            n += int(np.count_nonzero(self.planes(lo, min(lo + 64, self.nz))))
        return n


def max_distance(phase: Phase, spacing_zyx, *, threads: int = 1, max_planes: int | None = None,
                 core: int | None = None, unit: float = 1.0) -> float:
    """Exact largest squared distance (in units of ``spacing_zyx``, as the float32 distance map holds it; ``unit``
    mm each, for messages) over the phase, slab by slab.

    Each slab's core is certified (its distances cannot be lowered by voxels beyond the slab) or redone with
    twice the halo. ``max_planes`` bounds the planes of one slab (memory); raises :class:`SlabMemoryError`
    when the halo that is needed does not fit.
    """
    sz = float(spacing_zyx[0])
    nz = phase.nz
    max_planes = nz if max_planes is None else max(1, int(max_planes))
    r2 = 0.0
    h = 2
    a = 0
    while a < nz:
        while True:
            c = max(1, min(core or nz, max_planes - 2 * h))
            planes = min(c + 2 * h, nz)
            if planes > max_planes:
                raise SlabMemoryError(phase.name, planes, planes * phase.plane_voxels * EDT_BYTES, h * sz * unit)
            b = min(a + c, nz)
            lo, hi = max(a - h, 0), min(b + h, nz)
            ph = phase.planes(lo, hi)
            if not ph[a - lo:b - lo].any():
                break
            dsq = distance_sq(ph, spacing_zyx, threads=threads)[a - lo:b - lo]
            plane_max = dsq.reshape(b - a, -1).max(axis=1).astype(np.float64)
            del ph
            z = np.arange(a, b)
            lim = np.full(b - a, np.inf)
            if lo > 0:
                lim = np.minimum(lim, (z - lo + 1) * sz)
            if hi < nz:
                lim = np.minimum(lim, (hi - z) * sz)
            if np.all(plane_max <= lim * lim):
                r2 = max(r2, float(plane_max.max()))
                break
            h = min(2 * h, nz)
        a = b
    return r2


def halo_planes(r2_max: float, dz: float, method: str) -> tuple[int, int]:
    """(halo, extra distance-transform planes) that make a slab's core exact for this phase (see the module doc)."""
    k = int(math.ceil(math.sqrt(r2_max) / dz)) + 1
    return (3 * k if method == "fast" else k + 1), k


def slab_bytes(plane_voxels: int, core: int, halo: int, extra: int) -> float:
    """Estimated peak bytes of one slab: ``core`` planes, ``halo`` planes each side, ``extra`` distance planes."""
    return plane_voxels * ((core + 2 * halo) * SLAB_BYTES + core * CORE_BYTES + 2 * extra * EDT_BYTES)


def core_planes(slab_budget: float, plane_voxels: int, halo: int, extra: int, nz: int) -> int:
    """Largest core (planes, at most ``nz``) whose slab fits ``slab_budget`` bytes (0 if none)."""
    if slab_bytes(plane_voxels, nz, 0, 0) <= slab_budget:
        return nz  # one slab holds the whole region
    fixed = slab_bytes(plane_voxels, 0, halo, extra)
    return max(0, min(nz, int((slab_budget - fixed) // (plane_voxels * (SLAB_BYTES + CORE_BYTES)))))


class _Values:
    """A phase's thickness values in the statistics set, appended in C order to a temporary float32 file."""

    def __init__(self, folder: str, name: str):
        self.path = os.path.join(folder, f"{name}.f32")
        self._fh = open(self.path, "wb")
        self.n = 0
        self.finite = True

    def add(self, vals: np.ndarray) -> None:
        vals = np.ascontiguousarray(vals, np.float32)
        if vals.size:
            self.finite = self.finite and bool(np.isfinite(vals).all())
            self._fh.write(memoryview(vals).cast("B"))
            self.n += vals.size

    def array(self) -> np.ndarray:
        self._fh.close()
        if self.n == 0:
            return np.zeros(0, np.float32)
        return np.memmap(self.path, np.float32, mode="r", shape=(self.n,))


def _sd(vals: np.ndarray, mean: float, block: int = 1 << 22) -> float:
    acc = 0.0
    for i in range(0, vals.size, block):
        d = vals[i:i + block].astype(np.float64) - mean
        acc += float(np.dot(d, d))
    return math.sqrt(acc / vals.size)


def _phase_thickness_slabs(phase: Phase, spacing_zyx, r2_max: float, *, convention: str, method: str, threads: int,
                           core: int, halo: int, extra: int, values: _Values, sink, key: str, report,
                           done: int, total: int, all_phase: bool = False, unit: float = 1.0) -> int:
    """The phase's local thickness slab by slab, on the grid of ``spacing_zyx`` (``r2_max`` in its units), each
    core's map scaled by ``unit`` to mm (:func:`~.thickness.unit_spacing`) before it is summarised and sunk."""
    nz = phase.nz
    for a in range(0, nz, core):
        b = min(a + core, nz)
        pa, pb = max(a - halo, 0), min(b + halo, nz)
        if all_phase:
            out = np.full((b - a,) + phase.planes(0, 1).shape[1:], np.nan, np.float32)
        else:
            ea, eb = max(pa - extra, 0), min(pb + extra, nz)
            ph_e = phase.planes(ea, eb)
            if ph_e[a - ea:b - ea].any():
                dsq = np.ascontiguousarray(distance_sq(ph_e, spacing_zyx, threads=threads)[pa - ea:pb - ea])
                ph = np.ascontiguousarray(ph_e[pa - ea:pb - ea])
                del ph_e
                out = _scaled(_thickness_from_dsq(ph, dsq, spacing_zyx, convention, method, threads, r2_max=r2_max,
                                                  z0=pa, z_range=(a - pa, b - pa)), unit)  # only the core is painted
                del dsq, ph
            else:
                out = np.zeros((b - a,) + ph_e.shape[1:], np.float32)
                del ph_e
        values.add(out[phase.stat(a, b)])
        if sink is not None:
            sink.put(key, phase.zs.start + a, phase.zs.start + b, phase.ys, phase.xs, out)
        done += 1
        if report:
            report(done, total, f"{phase.name} slab {done}/{total}: planes {phase.zs.start + a}-"
                                f"{phase.zs.start + b - 1} (halo {halo} planes)")
    return done


def surface_and_euler(bone: np.ndarray, roi: np.ndarray, region, spacing_zyx, core: int,
                      surface: bool = True) -> tuple[float, int]:
    """Marching-cubes area (mm^2) and Euler characteristic of ``bone & roi``, in z-slabs sharing one plane."""
    from skimage.measure import euler_number, marching_cubes, mesh_surface_area

    zs, ys, xs = region
    nz = zs.stop - zs.start
    area, chi = 0.0, 0
    core = max(1, int(core))
    for a in range(0, nz, core):
        b = min(a + core, nz)
        top = min(b + 1, nz)  # the next slab's first plane: the cells between the two slabs are counted here
        z = slice(zs.start + a, zs.start + top)
        v = bone[z, ys, xs] & roi[z, ys, xs]
        if not v.any():
            continue
        chi += int(euler_number(v, connectivity=3))
        if top > b:
            chi -= int(euler_number(v[-1:], connectivity=3))  # that plane's cubes belong to both slabs
        if surface:
            pad_z = (1 if a == 0 else 0, 1 if top == nz else 0)  # the whole image is closed by zero padding
            vol = np.pad(v, (pad_z, (1, 1), (1, 1))).astype(np.float32)
            if vol.shape[0] >= 2:
                verts, faces, _, _ = marching_cubes(vol, level=0.5, spacing=tuple(float(s) for s in spacing_zyx))
                area += float(mesh_surface_area(verts, faces))
    return area, chi


def measure_in_slabs(bone: np.ndarray, roi: np.ndarray, spacing_zyx, *, convention: str = "default",
                     spheres: str = "roi", histogram_bins=32, surface: bool = True, threads: int = 1,
                     method: str = "fast", slab_budget: float | None = None, slab_planes: int | None = None,
                     sink=None, report: Callable | None = None) -> dict:
    """All parameters of :func:`~.parameters.measure_binary`, computed in z-slabs (``bone``, ``roi``: bool arrays).

    The core size comes from ``slab_budget`` (bytes for one slab's work, see :func:`slab_bytes`) or is forced
    with ``slab_planes``. Raises :class:`SlabMemoryError` when even a one-plane core does not fit.
    ``sink.put(key, z0, z1, ys, xs, block)`` receives the ``thickness`` and ``separation`` maps of each slab's
    core (region box ``ys, xs``; zero elsewhere), in z order per key. ``report(done, total, message)`` is
    called after each slab.
    """
    from .parameters import _crop_to, _histogram, describe_run, spacing_parameters

    from .validate import check_convention, check_method, check_run_options, check_spacing

    check_convention(convention)
    check_method(method)
    check_run_options(threads, histogram_bins)
    sp = check_spacing(spacing_zyx)  # near-equal spacings made equal, as on the whole image
    su, unit = unit_spacing(sp)  # the local thickness's grid (mm / unit)
    if slab_budget is None and slab_planes is None:
        raise ValueError("give slab_budget or slab_planes")
    roi_box = _crop_to(roi, 1)
    region = roi_box if spheres == "roi" else tuple(slice(0, n) for n in bone.shape)
    phases = [Phase("bone", bone, roi, region, spheres), Phase("marrow", bone, roi, region, spheres)]
    voxel_mm3 = float(np.prod(sp))
    n_roi = int(np.count_nonzero(roi))
    plane_voxels = phases[0].plane_voxels

    # pass 1: each phase's largest distance, hence its halo and core size
    max_planes = None if slab_budget is None else int(slab_budget // (plane_voxels * EDT_BYTES))
    plans = []
    for ph in phases:
        # a phase that fills the region has no boundary: its thickness is undefined (NaN), as on the whole image
        ph.all_phase = ph.count() == ph.nz * ph.plane_voxels
        r2 = 0.0 if ph.all_phase else max_distance(ph, su, threads=threads, max_planes=max_planes, core=slab_planes,
                                                   unit=unit)
        halo, extra = halo_planes(r2, su[0], method)
        if slab_planes is not None:
            core = int(slab_planes)
        else:
            core = core_planes(slab_budget, plane_voxels, halo, extra, ph.nz)
            if core < 1:
                need = min(slab_bytes(plane_voxels, 1, halo, extra), slab_bytes(plane_voxels, ph.nz, 0, 0))
                raise SlabMemoryError(ph.name, min(1 + 2 * halo, ph.nz), need, math.sqrt(r2) * unit)
        plans.append((ph, r2, halo, extra, min(core, ph.nz)))
    n_surf = int(slab_planes) if slab_planes is not None else \
        max(1, int(slab_budget // (plane_voxels * SURFACE_BYTES)) - 1)
    total = sum(-(-p[0].nz // p[4]) for p in plans)

    res: dict = {}
    summaries = {}
    with tempfile.TemporaryDirectory(prefix="ctsma-slabs-") as tmp:
        done = 0
        for (ph, r2, halo, extra, core), key in zip(plans, ("thickness", "separation")):
            vals = _Values(tmp, ph.name)
            done = _phase_thickness_slabs(ph, su, r2, convention=convention, method=method, threads=threads,
                                          core=core, halo=halo, extra=extra, values=vals, sink=sink, key=key,
                                          report=report, done=done, total=total, all_phase=ph.all_phase, unit=unit)
            arr = vals.array()
            s = {"n": vals.n, "finite": vals.finite}
            if vals.n and vals.finite:
                s["mean"] = float(arr.mean(dtype=np.float64))
                s["sd"] = _sd(arr, s["mean"])
                s["hist"] = _histogram(arr, histogram_bins)
            else:
                s["hist"] = _histogram(np.zeros(0, np.float32), histogram_bins)
            del arr
            summaries[ph.name] = s
    n_bone = summaries["bone"]["n"]
    res["BV/TV"] = n_bone / n_roi
    spacing_parameters(res, {k: (v["n"], v["finite"], v.get("mean"), v.get("sd")) for k, v in summaries.items()},
                       stacklevel=4)
    area, chi = surface_and_euler(bone, roi, roi_box, sp, n_surf, surface=surface and n_bone > 0)
    if surface and n_bone:
        res["BS/BV"] = area / (n_bone * voxel_mm3)
    else:
        res["BS/BV"] = float("nan")
    res["Conn.D"] = (1 - chi) / (n_roi * voxel_mm3) if n_bone else float("nan")
    describe_run(res, convention, method, spheres, sp, n_roi, n_bone, voxel_mm3)
    res["histograms"] = {"Tb.Th": summaries["bone"]["hist"], "Tb.Sp": summaries["marrow"]["hist"]}
    res["slabs"] = {"slabs": total, "surface_slab_planes": n_surf,
                    **{ph.name: {"core_planes": core, "halo_planes": halo, "distance_planes": extra,
                                 "max_distance_mm": math.sqrt(r2) * unit} for ph, r2, halo, extra, core in plans}}
    return res


class ArraySink:
    """Collects the slabs' maps into whole-grid float32 arrays (for ``return_maps``)."""

    def __init__(self, shape):
        self.maps = {"thickness": np.zeros(shape, np.float32), "separation": np.zeros(shape, np.float32)}

    def put(self, key, z0, z1, ys, xs, block):
        if key in self.maps:
            self.maps[key][z0:z1, ys, xs] = block


class StreamSink:
    """Streams the slabs' maps into :func:`ctsma.io.memory.streamed_nifti` writers (zero outside the region)."""

    def __init__(self, writers: dict):
        self.writers = writers

    def put(self, key, z0, z1, ys, xs, block):
        w = self.writers.get(key)
        if w is None:
            return
        w.write_zeros(z0)
        full = np.zeros((z1 - z0,) + w.shape_zyx[1:], np.float32)
        full[:, ys, xs] = block
        w.write(full)

    def finish(self):
        for w in self.writers.values():
            w.write_zeros(w.shape_zyx[0])


class TeeSink:
    def __init__(self, *sinks):
        self.sinks = [s for s in sinks if s is not None]

    def put(self, *args):
        for s in self.sinks:
            s.put(*args)
