"""Procedural trabecular texture: a periodic band-pass noise tile and the occupancy kernel.

The trabecular network is the union of *plates* and *rods* cut from three independent,
unit-variance, band-pass Gaussian-like random fields ``f1, f2, f3`` (channels of one tile):

- plates: ``|f1| < t_p`` (a thickened zero-level sheet network),
- rods:   ``|f2| < t_r`` and ``|f3| < t_w`` (the thickened intersection curves of two sheets; with
  ``t_w > t_r`` they widen into plate-like ribbons, the rod-to-plate shift of OA).

The tile is periodic (``TILE_N`` samples per side) and is sampled with trilinear interpolation,
so the field is defined at *every* point in space and can be re-evaluated for any box
(:func:`ctsma.phantom.truth_binary`). Each bone of each knee sees the tile through its own
rotation, offset and scale (``TILE_SAMPLES_PER_WAVELENGTH / wavelength``).

Why hand-written: the tile must be bit-identical on every machine. It is made from uniform
noise of numpy's PCG64 (exact dyadic numbers) by periodic separable convolutions with rounded
kernel weights, in fixed-order numba loops that use only IEEE basic arithmetic (no FFT library,
no fast-math), so no platform-specific rounding enters.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os

import numba
import numpy as np

TILE_N = 128
"""Samples per side of the periodic tile (a power of two)."""
TILE_SAMPLES_PER_WAVELENGTH = 12.8
"""Peak wavelength of the band-pass spectrum, in tile samples (10 wavelengths per period)."""
TILE_SEED = 20260611
"""Fixed seed of the one tile every knee shares (knees differ by rotation, offset and scale)."""
TILE_SHA256 = "319794a68bea4cad3207cfcc48c16e3f0d4baefa7eda8a9a9f1477c6b12bc3d7"
"""SHA-256 of the tile's float32 bytes: the same on every machine (checked by the tests and on cache reads)."""


def _kernel(sigma: float) -> np.ndarray:
    r = int(math.ceil(4.0 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w = np.round(w * 2.0 ** 24) / 2.0 ** 24  # rounded: identical on any libm
    return w / w.sum()


@numba.njit(cache=True)
def _conv_axis(a, w, axis):  # pragma: no cover - numba
    n0, n1, n2 = a.shape
    r = (w.shape[0] - 1) // 2
    out = np.zeros_like(a)
    if axis == 0:
        for i in range(n0):
            for k in range(w.shape[0]):
                ii = (i + k - r) % n0
                wk = w[k]
                for j in range(n1):
                    for l in range(n2):
                        out[i, j, l] += wk * a[ii, j, l]
    elif axis == 1:
        for i in range(n0):
            for j in range(n1):
                for k in range(w.shape[0]):
                    jj = (j + k - r) % n1
                    wk = w[k]
                    for l in range(n2):
                        out[i, j, l] += wk * a[i, jj, l]
    else:
        for i in range(n0):
            for j in range(n1):
                for l in range(n2):
                    s = 0.0
                    for k in range(w.shape[0]):
                        s += w[k] * a[i, j, (l + k - r) % n2]
                    out[i, j, l] = s
    return out


def _blur(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    for axis in range(3):
        a = _conv_axis(a, w, axis)
    return a


def _cache_file():
    base = os.environ.get("CTSMA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ctsma")
    return os.path.join(base, f"phantom_tile_{TILE_SEED}_{TILE_N}_v1.npz")


@functools.lru_cache(maxsize=1)
def tile() -> tuple[np.ndarray, np.ndarray]:
    """The shared tile (see :func:`make_tile`), read from the user cache when present."""
    path = _cache_file()
    try:
        with np.load(path) as z:
            t, g = z["tile"], z["grad"]
        if (t.shape == (TILE_N, TILE_N, TILE_N, 3) and t.dtype == np.float32
                and hashlib.sha256(t.tobytes()).hexdigest() == TILE_SHA256):
            t.setflags(write=False)
            return t, g
    except (OSError, KeyError, ValueError):
        pass
    t, g = make_tile()
    from ..errors import UserError
    from ..io.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            np.savez(tmp, tile=t, grad=g)
    except (OSError, UserError):
        pass  # no cache this time: the tile is rebuilt by the next process
    return t, g


def make_tile() -> tuple[np.ndarray, np.ndarray]:
    """The shared tile ``(N, N, N, 3)`` float32 and each channel's RMS gradient (per sample).

    Band-pass = difference of Gaussians (sigma ratio 1.6) of uniform white noise, each channel
    normalised to zero mean and unit variance. About 3 s on one core; :func:`tile` caches it
    on disk (``$CTSMA_CACHE_DIR`` or ``~/.cache/ctsma``) and per process.
    """
    rng = np.random.Generator(np.random.PCG64(TILE_SEED))
    s1 = TILE_SAMPLES_PER_WAVELENGTH / (2.0 * math.pi / 1.0980)  # DoG peak k* = 1.098 / sigma1
    s_extra = s1 * math.sqrt(1.6 ** 2 - 1.0)
    w1, w2 = _kernel(s1), _kernel(s_extra)
    chans, grads = [], []
    for _ in range(3):
        noise = rng.random((TILE_N, TILE_N, TILE_N)) - 0.5
        a = _blur(noise, w1)
        b = _blur(a, w2)
        f = a - b
        f = f - f.sum() / f.size
        f = f / math.sqrt((f * f).sum() / f.size)
        g2 = 0.0
        for axis in range(3):
            d = (np.roll(f, -1, axis) - np.roll(f, 1, axis)) * 0.5
            g2 += (d * d).sum() / d.size
        chans.append(f.astype(np.float32))
        grads.append(math.sqrt(g2))
    t = np.ascontiguousarray(np.stack(chans, axis=-1))
    t.setflags(write=False)
    return t, np.array(grads)


@numba.njit(cache=True, inline="always")
def _sample3(t, u0, u1, u2, out):  # pragma: no cover - numba
    mask = t.shape[0] - 1  # TILE_N is a power of two: & mask is the periodic wrap
    f0 = math.floor(u0)
    f1 = math.floor(u1)
    f2 = math.floor(u2)
    a0 = u0 - f0
    a1 = u1 - f1
    a2 = u2 - f2
    i0 = int(f0) & mask
    i1 = int(f1) & mask
    i2 = int(f2) & mask
    j0 = (i0 + 1) & mask
    j1 = (i1 + 1) & mask
    j2 = (i2 + 1) & mask
    w000 = (1.0 - a0) * (1.0 - a1) * (1.0 - a2)
    w001 = (1.0 - a0) * (1.0 - a1) * a2
    w010 = (1.0 - a0) * a1 * (1.0 - a2)
    w011 = (1.0 - a0) * a1 * a2
    w100 = a0 * (1.0 - a1) * (1.0 - a2)
    w101 = a0 * (1.0 - a1) * a2
    w110 = a0 * a1 * (1.0 - a2)
    w111 = a0 * a1 * a2
    for c in range(3):
        out[c] = (w000 * t[i0, i1, i2, c] + w001 * t[i0, i1, j2, c] + w010 * t[i0, j1, i2, c]
                  + w011 * t[i0, j1, j2, c] + w100 * t[j0, i1, i2, c] + w101 * t[j0, i1, j2, c]
                  + w110 * t[j0, j1, i2, c] + w111 * t[j0, j1, j2, c])


@numba.njit(cache=True)
def _occupancy(t, centres, bone, tp, tr, tw, A, o, MJ, gmm, offsets, h, hard):  # pragma: no cover - numba
    m = centres.shape[0]
    s = offsets.shape[0]
    out = np.zeros(m, dtype=np.float32)
    f = np.zeros(3)
    for i in range(m):
        b = bone[i]
        c0 = centres[i, 0]
        c1 = centres[i, 1]
        c2 = centres[i, 2]
        u0 = A[b, 0, 0] * c0 + A[b, 0, 1] * c1 + A[b, 0, 2] * c2 + o[b, 0]
        u1 = A[b, 1, 0] * c0 + A[b, 1, 1] * c1 + A[b, 1, 2] * c2 + o[b, 1]
        u2 = A[b, 2, 0] * c0 + A[b, 2, 1] * c1 + A[b, 2, 2] * c2 + o[b, 2]
        p = tp[i]
        r = tr[i]
        w = tw[i]
        g = gmm[b]
        acc = 0.0
        for k in range(s):
            e0 = offsets[k, 0]
            e1 = offsets[k, 1]
            e2 = offsets[k, 2]
            v0 = u0 + MJ[b, 0, 0] * e0 + MJ[b, 0, 1] * e1 + MJ[b, 0, 2] * e2
            v1 = u1 + MJ[b, 1, 0] * e0 + MJ[b, 1, 1] * e1 + MJ[b, 1, 2] * e2
            v2 = u2 + MJ[b, 2, 0] * e0 + MJ[b, 2, 1] * e1 + MJ[b, 2, 2] * e2
            _sample3(t, v0, v1, v2, f)
            dp = p - abs(f[0])
            dr = min(r - abs(f[1]), w - abs(f[2]))
            d = max(dp, dr) / g  # approximate signed distance to the bone surface, mm
            if hard:
                if d > 0.0:
                    acc += 1.0
            else:
                x = 0.5 + d / h
                if x >= 1.0:
                    acc += 1.0
                elif x > 0.0:
                    acc += x
        out[i] = acc / s
    return out


def subsample_offsets(spacing_xyz, step_mm: float) -> tuple[np.ndarray, float]:
    """Regular sub-sample offsets (mm, image axes) inside one voxel, and the sub-sample size."""
    n = [max(1, int(round(s / step_mm))) for s in spacing_xyz]
    axes = [((np.arange(k) + 0.5) / k - 0.5) * s for k, s in zip(n, spacing_xyz)]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    h = float(np.mean([s / k for k, s in zip(n, spacing_xyz)]))
    return np.ascontiguousarray(g, dtype=np.float64), h


def occupancy(centres, bone, tp, tr, fields, offsets, h, *, tw=None, J=None, hard=False) -> np.ndarray:
    """Mean bone occupancy of the sub-samples around each centre (MR-frame mm).

    ``fields`` is a :class:`ctsma.phantom.anatomy.FieldFrames`: per bone index the matrix ``A``
    and offset ``o`` that map MR mm to tile samples, and ``gmm`` the RMS field gradient per mm.
    ``J`` (nb, 3, 3) maps image-axis offsets to MR-frame offsets (identity for MR grids).
    ``tp``/``tr`` are the plate/rod thresholds in field units and ``tw`` the rod width threshold
    (rods widen into plate-like ribbons when ``tw > tr``; default ``tw = tr``). ``hard`` gives 0/1 occupancy.
    """
    t, _ = tile()
    if tw is None:
        tw = tr
    nb = fields.A.shape[0]
    if J is None:
        J = np.broadcast_to(np.eye(3), (nb, 3, 3))
    MJ = np.ascontiguousarray(np.einsum("bij,bjk->bik", fields.A, J))
    return _occupancy(t, np.ascontiguousarray(centres, dtype=np.float64), np.ascontiguousarray(bone, dtype=np.int64),
                      np.ascontiguousarray(tp, dtype=np.float32), np.ascontiguousarray(tr, dtype=np.float32),
                      np.ascontiguousarray(tw, dtype=np.float32), np.ascontiguousarray(fields.A), np.ascontiguousarray(fields.o), MJ,
                      np.ascontiguousarray(fields.gmm), np.ascontiguousarray(offsets, dtype=np.float64),
                      float(h), bool(hard))


@numba.njit(cache=True, inline="always")
def _lerp3(v, i0, i1, i2, a0, a1, a2):  # pragma: no cover - numba
    """Trilinear interpolation of lattice ``v`` (z, y, x) at integer corner (i0, i1, i2) + fractions."""
    n0, n1, n2 = v.shape
    j0 = min(i0 + 1, n0 - 1)
    j1 = min(i1 + 1, n1 - 1)
    j2 = min(i2 + 1, n2 - 1)
    c00 = v[i0, i1, i2] * (1.0 - a2) + v[i0, i1, j2] * a2
    c01 = v[i0, j1, i2] * (1.0 - a2) + v[i0, j1, j2] * a2
    c10 = v[j0, i1, i2] * (1.0 - a2) + v[j0, i1, j2] * a2
    c11 = v[j0, j1, i2] * (1.0 - a2) + v[j0, j1, j2] * a2
    return (c00 * (1.0 - a1) + c01 * a1) * (1.0 - a0) + (c10 * (1.0 - a1) + c11 * a1) * a0


@numba.njit(cache=True)
def _truth_grid(t, dist, shell, tp, tr, tw, near, org, sp, size, lat, l0, A, o, trab_only):  # pragma: no cover
    nx, ny, nz = size[0], size[1], size[2]
    out = np.zeros((nz, ny, nx), dtype=np.bool_)
    f = np.zeros(3)
    n0, n1, n2 = dist.shape
    for k in range(nz):
        z = org[2] + k * sp[2]
        gz = z / lat - l0[2]
        iz = min(max(int(math.floor(gz)), 0), n0 - 1)
        az = min(max(gz - iz, 0.0), 1.0)
        for j in range(ny):
            y = org[1] + j * sp[1]
            gy = y / lat - l0[1]
            iy = min(max(int(math.floor(gy)), 0), n1 - 1)
            ay = min(max(gy - iy, 0.0), 1.0)
            for i in range(nx):
                x = org[0] + i * sp[0]
                gx = x / lat - l0[0]
                ix = min(max(int(math.floor(gx)), 0), n2 - 1)
                ax = min(max(gx - ix, 0.0), 1.0)
                d = _lerp3(dist, iz, iy, ix, az, ay, ax)
                if d >= 0.0:
                    continue
                s = _lerp3(shell, iz, iy, ix, az, ay, ax)
                if d >= -s:
                    out[k, j, i] = not trab_only
                    continue
                b = near[min(iz + (1 if az >= 0.5 else 0), n0 - 1), min(iy + (1 if ay >= 0.5 else 0), n1 - 1),
                         min(ix + (1 if ax >= 0.5 else 0), n2 - 1)]
                u0 = A[b, 0, 0] * x + A[b, 0, 1] * y + A[b, 0, 2] * z + o[b, 0]
                u1 = A[b, 1, 0] * x + A[b, 1, 1] * y + A[b, 1, 2] * z + o[b, 1]
                u2 = A[b, 2, 0] * x + A[b, 2, 1] * y + A[b, 2, 2] * z + o[b, 2]
                _sample3(t, u0, u1, u2, f)
                p = _lerp3(tp, iz, iy, ix, az, ay, ax)
                r = _lerp3(tr, iz, iy, ix, az, ay, ax)
                w = _lerp3(tw, iz, iy, ix, az, ay, ax)
                if p - abs(f[0]) > 0.0 or (r - abs(f[1]) > 0.0 and w - abs(f[2]) > 0.0):
                    out[k, j, i] = True
    return out


def truth_grid(fields, lattice: dict, org, sp, size, lat_mm: float, l0, trabecular_only: bool) -> np.ndarray:
    """Hard truth on a regular grid from smooth fields given on a lattice (see ``truth.truth_binary``)."""
    t, _ = tile()
    c = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in lattice.items() if k != "near"}
    return _truth_grid(t, c["dist"], c["shell"], c["tp"], c["tr"], c["tw"],
                       np.ascontiguousarray(lattice["near"], dtype=np.int64), np.asarray(org, dtype=np.float64),
                       np.asarray(sp, dtype=np.float64), np.asarray(size, dtype=np.int64), float(lat_mm),
                       np.asarray(l0, dtype=np.float64), np.ascontiguousarray(fields.A),
                       np.ascontiguousarray(fields.o), bool(trabecular_only))
