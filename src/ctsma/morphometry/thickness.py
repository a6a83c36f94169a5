"""Local thickness by maximal inscribed spheres (Hildebrand & Rüegsegger 1997).

Algorithm (the same three steps as BoneJ's *Local Thickness*, after Dougherty & Kunzelmann 2007):

1. squared Euclidean distance transform of the phase (``edt`` package, anisotropic, in mm²);
2. distance ridge: a voxel is a sphere centre unless a 26-neighbour's sphere contains its sphere
   (``r_q >= r_p + |p - q|``), so only the medial set is painted;
3. each phase voxel takes the largest sphere (centred on a ridge voxel) that contains it.

Step 3 is hand-written (numba) because no maintained library offers it with continuous radii and
anisotropic spacing: porespy quantises radii to integers and localthickness approximates. Spheres are
painted in descending order of their value, row by row: in each (z, y) row a sphere covers one
x-interval, and a per-row "next unassigned voxel" pointer array (a union-find with path halving) makes
every voxel be written exactly once, so the cost is about the sum of r² over ridge voxels rather
than r³.

Conventions for the value a sphere gives (its coverage is the same in both):

* ``"bonej"``: diameter ``2 r`` with ``r`` the distance from the centre voxel to the nearest
  *background voxel centre*. This is BoneJ's rule: a plate of ``t`` voxels reads ``t`` for even and
  ``t + 1`` for odd ``t``.
* ``"default"`` (bias-corrected): the radius is measured to the boundary of the voxelised object
  (half a voxel before the background voxel centre, along the local normal: ``- beta``) and the
  ridge is located to sub-voxel precision (``+ delta``): along each axis on which the centre is a
  local maximum of the distance, the distance profile is a tent of unit slope, and three samples
  ``a <= b >= c`` put its apex ``|c - a| / 2`` above ``b``. A plate of ``t`` voxels then reads ``t``
  for both parities; see ``docs/morphometry.md`` for the analytic validation.
"""

from __future__ import annotations

import math

import edt
import numba
import numpy as np

CONVENTIONS = ("default", "bonej")


def distance_sq(phase: np.ndarray, spacing_zyx, *, threads: int = 1) -> np.ndarray:
    """Squared distance (mm², float32) from each phase voxel to the nearest non-phase voxel centre.

    The image border is not a boundary (what lies beyond it is unknown), as in scipy and the peers.
    """
    return edt.edtsq(np.ascontiguousarray(phase, dtype=np.uint8), anisotropy=tuple(float(s) for s in spacing_zyx),
                     black_border=False, parallel=max(1, int(threads)))


REACH = 1  # ridge test against the 26-neighbourhood (a larger reach removed < 1 % more voxels)
LEVEL = 0.5  # |second difference| / length below which a lattice direction counts as level (in-plane)

def _offset_types(reach: int):
    return [(a, b, c) for a in range(reach + 1) for b in range(reach + 1) for c in range(reach + 1) if a or b or c]


def _neighbours(spacing_zyx, reach: int):
    """Offsets within ``reach`` voxels (nearest first), their type index in the table and their length."""
    types = {t: i for i, t in enumerate(_offset_types(reach))}
    h = np.asarray(spacing_zyx, float)
    offs = [(a, b, c) for a in range(-reach, reach + 1) for b in range(-reach, reach + 1)
            for c in range(-reach, reach + 1) if a or b or c]
    offs.sort(key=lambda o: float(((np.asarray(o) * h) ** 2).sum()))
    kind = np.array([types[(abs(a), abs(b), abs(c))] for a, b, c in offs], np.int64)
    dist = np.array([float(np.sqrt(((np.asarray(o) * h) ** 2).sum())) for o in offs])
    return np.array(offs, np.int64), kind, dist
_TABLE_MAX_POINTS = 3_000_000


def containment_table(spacing_zyx, r2_max: float, reach: int = 1):
    """Lookup for the discrete-sphere containment test of the distance ridge.

    A sphere is the open discrete ball ``{v : |v - p|^2 < r^2}`` (voxel centres, in mm). The ball of radius
    ``r`` at ``p`` lies inside the ball of radius ``R`` at the neighbour ``p + o`` iff
    ``R^2 > M_o(r^2) = max_{|u|^2 < r^2} |u - o|^2`` over lattice vectors ``u``. By symmetry ``M`` depends
    only on ``|o|`` per axis. Returns the sorted squared lengths ``s`` of the lattice
    vectors of one octant and, per type, the running maximum of ``|u - o|^2`` in that order (BoneJ builds
    the equivalent table for integer squared distances; this one also handles anisotropic spacing).
    """
    h = np.asarray(spacing_zyx, float)
    n = np.ceil(np.sqrt(r2_max) / h).astype(int) + 1
    while np.prod(n + 1) > _TABLE_MAX_POINTS:
        n = np.maximum(n * 3 // 4, 1)
    u = np.stack(np.meshgrid(*[np.arange(k + 1) * hh for k, hh in zip(n, h)], indexing="ij"), -1).reshape(-1, 3)
    s = (u ** 2).sum(1)
    order = np.argsort(s, kind="stable")
    s = s[order]
    u = u[order]
    types = _offset_types(reach)
    cm = np.empty((len(types), len(s)))
    for k, o in enumerate(types):
        oh = np.asarray(o) * h
        cm[k] = np.maximum.accumulate(((u + oh) ** 2).sum(1))
    # the table is exact for r^2 up to the smallest squared extent it fully encloses
    r2_valid = float(min((n * h) ** 2))
    return s, cm, r2_valid


@numba.njit(cache=True, nogil=True)
def _default_radius(dsq, z, y, x, r, hs):
    """Bias-corrected radius (mm) of the sphere at ridge voxel (z, y, x) whose distance is ``r``.

    * ``delta`` (sub-voxel apex): along each axis on which the voxel is a local maximum, a tent of unit
      slope through ``a <= r >= c`` peaks ``|c - a| / 2`` above ``r``. For a plate the axes all see the
      same apex (take the largest); for a point-like (sphere) or line-like (rod) ridge the per-axis
      offsets are components of one offset vector (take their norm).
    * ``beta`` (boundary offset): the distance runs to the nearest background voxel *centre*. Against a
      flat face that centre lies half a voxel (along the normal) beyond the object's boundary; against a
      curved face (sphere, rod) the nearest of the many background centres lies on the boundary, so
      ``beta`` is 0. The ridge of a plate is level along in-plane lattice directions: a voxel with at
      least two such directions (of the 13 of its 26-neighbourhood) is plate-like.
    """
    nz, ny, nx = dsq.shape
    pos = (z, y, x)
    dims = (nz, ny, nx)
    dmax = 0.0
    dn2 = 0.0
    g2 = 0.0
    b2 = 0.0
    tol = 1e-4 * min(hs[0], min(hs[1], hs[2]))
    for ax in range(3):
        p = pos[ax]
        if p - 1 < 0 or p + 1 >= dims[ax]:
            continue
        if ax == 0:
            lo = math.sqrt(dsq[z - 1, y, x])
            hi = math.sqrt(dsq[z + 1, y, x])
        elif ax == 1:
            lo = math.sqrt(dsq[z, y - 1, x])
            hi = math.sqrt(dsq[z, y + 1, x])
        else:
            lo = math.sqrt(dsq[z, y, x - 1])
            hi = math.sqrt(dsq[z, y, x + 1])
        slope = (r - min(lo, hi)) / hs[ax]  # gradient component of the distance (unitless)
        if slope > 0:
            g2 += slope * slope
            b2 += (slope * hs[ax]) ** 2
        if lo <= r + tol and hi <= r + tol:
            dk = abs(hi - lo) / 2.0
            dn2 += dk * dk
            if dk > dmax:
                dmax = dk
    n_level = 0
    for a in range(0, 2):
        for b in range(-1, 2):
            for c in range(-1, 2):
                if a == 0 and (b < 0 or (b == 0 and c <= 0)):
                    continue  # one of each +-o pair
                z1, y1, x1, z2, y2, x2 = z + a, y + b, x + c, z - a, y - b, x - c
                in1 = 0 <= z1 < nz and 0 <= y1 < ny and 0 <= x1 < nx
                in2 = 0 <= z2 < nz and 0 <= y2 < ny and 0 <= x2 < nx
                if not (in1 or in2):
                    continue
                olen = math.sqrt((a * hs[0]) ** 2 + (b * hs[1]) ** 2 + (c * hs[2]) ** 2)
                if in1 and in2:
                    drop = 2.0 * r - math.sqrt(dsq[z1, y1, x1]) - math.sqrt(dsq[z2, y2, x2])
                elif in1:  # at the image border: assume symmetry
                    drop = 2.0 * (r - math.sqrt(dsq[z1, y1, x1]))
                else:
                    drop = 2.0 * (r - math.sqrt(dsq[z2, y2, x2]))
                if abs(drop) < LEVEL * olen:
                    n_level += 1
    if n_level >= 2:  # plate-like
        # half a voxel along the normal, estimated from the distance's gradient components
        beta = 0.5 * math.sqrt(b2 / g2) if g2 > 0 else 0.5 * min(hs[0], min(hs[1], hs[2]))
        return r + dmax - beta
    return r + math.sqrt(dn2)


@numba.njit(cache=True, nogil=True)
def _ridge_values(dsq, sz, sy, sx, default_conv, s_tab, cm_tab, r2_valid, offs, kind, dist):
    """Ridge voxels (flat indices) and the diameter each one's sphere gives."""
    nz, ny, nx = dsq.shape
    hs = (sz, sy, sx)
    n = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if dsq[z, y, x] > 0:
                    n += 1
    idx = np.empty(n, np.int64)
    val = np.empty(n, np.float32)
    thr = np.empty(cm_tab.shape[0], np.float64)
    nnb = offs.shape[0]
    m = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                d2 = dsq[z, y, x]
                if d2 <= 0:
                    continue
                r = math.sqrt(d2)
                have_thr = False
                ridge = True
                for k in range(nnb):
                    zz = z + offs[k, 0]
                    yy = y + offs[k, 1]
                    xx = x + offs[k, 2]
                    if zz < 0 or yy < 0 or xx < 0 or zz >= nz or yy >= ny or xx >= nx:
                        continue
                    q2 = dsq[zz, yy, xx]
                    if q2 <= d2:
                        continue
                    if math.sqrt(q2) >= r + dist[k]:  # contained even as continuous balls
                        ridge = False
                        break
                    if d2 >= r2_valid:
                        continue
                    if not have_thr:  # thresholds of the exact discrete test, once per voxel
                        i = np.searchsorted(s_tab, d2 * (1.0 - 1e-6))  # lattice vectors with |u|^2 < d2
                        for t in range(cm_tab.shape[0]):
                            thr[t] = cm_tab[t, i - 1] * (1.0 + 1e-6) if i > 0 else -1.0
                        have_thr = True
                    if q2 > thr[kind[k]]:
                        ridge = False
                        break
                if not ridge:
                    continue
                val[m] = 2.0 * (_default_radius(dsq, z, y, x, r, hs) if default_conv else r)
                idx[m] = (z * ny + y) * nx + x
                m += 1
    return idx[:m], val[:m]


@numba.njit(cache=True, nogil=True)
def _find(nxt, base, x):
    # smallest unassigned x' >= x in the row starting at flat index base (path halving)
    while nxt[base + x] != x:
        p = nxt[base + x]
        nxt[base + x] = nxt[base + p]
        x = p
    return x


@numba.njit(cache=True, nogil=True)
def _paint(phase, dsq, order_idx, order_val, sz, sy, sx):
    nz, ny, nx = phase.shape
    out = np.zeros((nz, ny, nx), np.float32)
    w = nx + 1
    nxt = np.empty(nz * ny * w, np.int32)
    left = np.zeros(nz * ny, np.int32)  # unassigned voxels per row: a full row is skipped cheaply
    for z in range(nz):
        for y in range(ny):
            base = (z * ny + y) * w
            for x in range(nx):
                if phase[z, y, x]:
                    nxt[base + x] = x
                    left[z * ny + y] += 1
                else:
                    nxt[base + x] = x + 1
            nxt[base + nx] = nx
    tol = 1e-6
    for i in range(order_idx.shape[0]):
        f = order_idx[i]
        x0 = f % nx
        y0 = (f // nx) % ny
        z0 = f // (nx * ny)
        r = math.sqrt(dsq[z0, y0, x0]) * (1.0 - tol)
        r2 = r * r
        v = order_val[i]
        kz = int(r / sz)
        for dz in range(-kz, kz + 1):
            z = z0 + dz
            if z < 0 or z >= nz:
                continue
            rz2 = r2 - (dz * sz) ** 2
            if rz2 <= 0:
                continue
            ky = int(math.sqrt(rz2) / sy)
            for dy in range(-ky, ky + 1):
                y = y0 + dy
                if y < 0 or y >= ny:
                    continue
                ry2 = rz2 - (dy * sy) ** 2
                if ry2 <= 0:
                    continue
                kx = int(math.sqrt(ry2) / sx)
                if (kx * sx) ** 2 >= ry2:  # open ball: strictly inside
                    kx -= 1
                if kx < 0:
                    continue
                row = z * ny + y
                if left[row] == 0:
                    continue
                lo = max(x0 - kx, 0)
                hi = min(x0 + kx, nx - 1)
                base = row * w
                x = _find(nxt, base, lo)
                while x <= hi:
                    out[z, y, x] = v
                    nxt[base + x] = x + 1
                    left[row] -= 1
                    x = _find(nxt, base, x + 1)
    return out


def local_thickness(binary: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), convention: str = "default", *,
                    threads: int = 1) -> np.ndarray:
    """Local thickness **diameter** (mm, float32) at each foreground voxel of ``binary`` (z, y, x); 0 elsewhere.

    ``spacing_zyx`` is the voxel size in mm along (z, y, x). ``convention`` is ``"default"``
    (bias-corrected: a plate of t voxels reads t) or ``"bonej"`` (BoneJ's rule: t+1 for odd t).
    For the separation (marrow) map pass the marrow phase, e.g. ``~bone & roi``. A phase that fills the
    whole array has no boundary, so its thickness is undefined: the map is NaN.
    """
    from .validate import check_binary, check_spacing, check_convention
    b = check_binary(binary)
    sp = check_spacing(spacing_zyx)
    check_convention(convention)
    if not b.any():
        return np.zeros(b.shape, np.float32)
    if b.all():  # no boundary anywhere: every sphere is unbounded
        return np.full(b.shape, np.nan, np.float32)
    dsq = distance_sq(b, sp, threads=threads)
    return _thickness_from_dsq(b, dsq, sp, convention)


def _thickness_from_dsq(b, dsq, sp, convention):
    s_tab, cm_tab, r2_valid = _table(tuple(float(x) for x in sp), float(dsq.max()), REACH)
    offs, kind, dist = _neighbours(sp, REACH)
    idx, val = _ridge_values(dsq, float(sp[0]), float(sp[1]), float(sp[2]), convention == "default",
                             s_tab, cm_tab, r2_valid, offs, kind, dist)
    order = np.argsort(-val)
    return _paint(b, dsq, idx[order], val[order], float(sp[0]), float(sp[1]), float(sp[2]))


_TABLES: dict = {}


def _table(sp, r2_max, reach):
    """Cached :func:`containment_table`, grown in powers of two of r^2."""
    need = max(4.0 * max(sp) ** 2, r2_max)
    for (key_sp, key_r2, key_reach), tab in _TABLES.items():
        if key_sp == sp and key_r2 >= need and key_reach == reach:
            return tab
    r2 = 4.0 * max(sp) ** 2
    while r2 < need:
        r2 *= 2
    tab = containment_table(sp, r2, reach)
    if len(_TABLES) > 8:
        _TABLES.clear()
    _TABLES[(sp, r2, reach)] = tab
    return tab
