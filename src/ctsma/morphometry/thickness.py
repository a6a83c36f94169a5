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


LIST_MAX = 256  # below this many unassigned voxels a block tests them one by one
BLOCK = 16  # edge (voxels) of the painter's cache-sized blocks
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
def _block_lists(shape, cz, cy, cx, rad, sz, sy, sx, B):
    """For each block of B^3 voxels, the spheres (in painting order) whose ball meets it (CSR arrays)."""
    nz, ny, nx = shape
    nbz, nby, nbx = (nz + B - 1) // B, (ny + B - 1) // B, (nx + B - 1) // B
    counts = np.zeros(nbz * nby * nbx + 1, np.int64)
    for second in range(2):
        if second:
            for i in range(1, counts.shape[0]):
                counts[i] += counts[i - 1]
            items = np.empty(counts[-1], np.int32)
            fill = counts[:-1].copy()
        for i in range(cz.shape[0]):
            z0, y0, x0, r = cz[i], cy[i], cx[i], rad[i]
            r2 = r * r
            zlo, zhi = max(z0 - int(r / sz), 0), min(z0 + int(r / sz), nz - 1)
            ylo, yhi = max(y0 - int(r / sy), 0), min(y0 + int(r / sy), ny - 1)
            xlo, xhi = max(x0 - int(r / sx), 0), min(x0 + int(r / sx), nx - 1)
            for bz in range(zlo // B, zhi // B + 1):
                ddz = max(0, max(bz * B - z0, z0 - (bz * B + B - 1))) * sz
                for by in range(ylo // B, yhi // B + 1):
                    ddy = max(0, max(by * B - y0, y0 - (by * B + B - 1))) * sy
                    if ddz * ddz + ddy * ddy >= r2:
                        continue
                    for bx in range(xlo // B, xhi // B + 1):
                        ddx = max(0, max(bx * B - x0, x0 - (bx * B + B - 1))) * sx
                        if ddz * ddz + ddy * ddy + ddx * ddx >= r2:
                            continue
                        k = (bz * nby + by) * nbx + bx
                        if second:
                            items[fill[k]] = i
                            fill[k] += 1
                        else:
                            counts[k + 1] += 1
    return counts, items


def _paint_blocks_py(phase, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, B):
    """Paint each block from its own sphere list, largest value first; blocks are independent.

    Inside a block a per-row "next unassigned voxel" array (union-find with path halving) makes each
    voxel be written once, and a block stops reading its list as soon as every voxel is assigned.
    Everything a block touches stays in the CPU cache, which is what makes this fast.
    """
    nz, ny, nx = phase.shape
    nbz, nby, nbx = (nz + B - 1) // B, (ny + B - 1) // B, (nx + B - 1) // B
    W = B + 1
    for k_ in numba.prange(nbz * nby * nbx):
        k = np.int64(k_)  # parfor indices are unsigned: mixed with int64 they would type as float64
        bz, rem = divmod(k, nby * nbx)
        by, bx = divmod(rem, nbx)
        z_a, y_a, x_a = bz * B, by * B, bx * B
        z_b, y_b, x_b = min(z_a + B, nz), min(y_a + B, ny), min(x_a + B, nx)
        nxt = np.empty(B * B * W, np.int32)
        rowleft = np.zeros(B * B, np.int32)
        zleft = np.zeros(B, np.int32)
        left = 0
        for z in range(z_a, z_b):
            for y in range(y_a, y_b):
                rb = ((z - z_a) * B + (y - y_a)) * W
                for x in range(x_a, x_b):
                    lx = x - x_a
                    if phase[z, y, x]:
                        nxt[rb + lx] = lx
                        rowleft[(z - z_a) * B + (y - y_a)] += 1
                        zleft[z - z_a] += 1
                        left += 1
                    else:
                        nxt[rb + lx] = lx + 1
                for lx in range(x_b - x_a, W):
                    nxt[rb + lx] = lx
        listed = False  # few voxels left: test them one by one instead of scanning rows
        lzs = np.empty(LIST_MAX, np.int32)
        lys = np.empty(LIST_MAX, np.int32)
        lxs = np.empty(LIST_MAX, np.int32)
        for j in range(counts[k], counts[k + 1]):
            if left == 0:
                break
            i = items[j]
            z0, y0, x0, r, v = cz[i], cy[i], cx[i], rad[i], val[i]
            r2 = r * r
            if not listed and left <= LIST_MAX:
                n = 0
                for row in range(B * B):
                    if rowleft[row] == 0:
                        continue
                    lz, ly = divmod(row, B)
                    x = _find(nxt, row * W, 0)
                    while x < x_b - x_a:
                        lzs[n] = lz + z_a
                        lys[n] = ly + y_a
                        lxs[n] = x + x_a
                        n += 1
                        x = _find(nxt, row * W, x + 1)
                listed = True
            if listed:
                q = 0
                while q < left:
                    dz = (lzs[q] - z0) * sz
                    dy = (lys[q] - y0) * sy
                    dx = (lxs[q] - x0) * sx
                    if dz * dz + dy * dy + dx * dx < r2:
                        out[lzs[q], lys[q], lxs[q]] = v
                        left -= 1
                        lzs[q], lys[q], lxs[q] = lzs[left], lys[left], lxs[left]
                    else:
                        q += 1
                continue
            for z in range(max(z_a, z0 - int(r / sz)), min(z_b, z0 + int(r / sz) + 1)):
                if zleft[z - z_a] == 0:
                    continue
                rz2 = r2 - ((z - z0) * sz) ** 2
                if rz2 <= 0:
                    continue
                ky = int(math.sqrt(rz2) / sy)
                for y in range(max(y_a, y0 - ky), min(y_b, y0 + ky + 1)):
                    row = (z - z_a) * B + (y - y_a)
                    if rowleft[row] == 0:
                        continue
                    ry2 = rz2 - ((y - y0) * sy) ** 2
                    if ry2 <= 0:
                        continue
                    h = int(math.sqrt(ry2) / sx)
                    if (h * sx) ** 2 >= ry2:  # open ball: strictly inside
                        h -= 1
                    lo = max(x0 - h, x_a) - x_a
                    hi = min(x0 + h, x_b - 1) - x_a
                    if lo > hi:
                        continue
                    rb = row * W
                    x = _find(nxt, rb, lo)
                    while x <= hi:
                        out[z, y, x + x_a] = v
                        nxt[rb + x] = x + 1
                        rowleft[row] -= 1
                        zleft[z - z_a] -= 1
                        left -= 1
                        x = _find(nxt, rb, x + 1)


@numba.njit(cache=True, nogil=True)
def _find(nxt, base, x):
    # smallest unassigned x' >= x in the row starting at flat index base (path halving)
    while nxt[base + x] != x:
        p = nxt[base + x]
        nxt[base + x] = nxt[base + p]
        x = p
    return x


# the serial build is safe to call from several Python threads at once (batch mode); the parallel
# build spreads the blocks of one large image over numba's threads
_paint_blocks_serial = numba.njit(cache=True, nogil=True)(_paint_blocks_py)
_paint_blocks_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_paint_blocks_py)


def _paint(phase, dsq, order_idx, order_val, sz, sy, sx, parallel=False, z_range=None):
    """Local thickness map: every phase voxel takes the value of the first sphere (in the given order) containing it.

    ``z_range=(lo, hi)`` paints only the planes ``lo:hi`` (the map returned has those planes), with the spheres
    that reach them: each voxel gets the same value as in the whole map.
    """
    nz, ny, nx = phase.shape
    cz = (order_idx // (nx * ny)).astype(np.int64)
    cy = ((order_idx // nx) % ny).astype(np.int64)
    cx = (order_idx % nx).astype(np.int64)
    rad = np.sqrt(dsq.ravel()[order_idx].astype(np.float64)) * (1.0 - 1e-6)
    if z_range is not None:
        lo, hi = int(z_range[0]), int(z_range[1])
        keep = np.maximum(np.maximum(lo - cz, cz - (hi - 1)), 0) * sz < rad  # the open ball meets the planes
        cz, cy, cx, rad, order_val = cz[keep] - lo, cy[keep], cx[keep], rad[keep], order_val[keep]
        phase = phase[lo:hi]
    counts, items = _block_lists(phase.shape, cz, cy, cx, rad, sz, sy, sx, BLOCK)
    out = np.zeros(phase.shape, np.float32)
    paint = _paint_blocks_parallel if parallel else _paint_blocks_serial
    paint(phase, out, counts, items, cz, cy, cx, rad, order_val.astype(np.float32), sz, sy, sx, BLOCK)
    return out


METHODS = ("fast", "exact")


def local_thickness(binary: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), convention: str = "default", *,
                    method: str = "fast", threads: int = 1) -> np.ndarray:
    """Local thickness **diameter** (mm, float32) at each foreground voxel of ``binary`` (z, y, x); 0 elsewhere.

    ``spacing_zyx`` is the voxel size in mm along (z, y, x). ``convention`` is ``"default"``
    (bias-corrected: a plate of t voxels reads t) or ``"bonej"`` (BoneJ's rule: t+1 for odd t).
    For the separation (marrow) map pass the marrow phase, e.g. ``~bone & roi``. A phase that fills the
    whole array has no boundary, so its thickness is undefined: the map is NaN.

    ``method="exact"`` paints every distance-ridge sphere; ``"fast"`` (default) paints only the reduced
    medial axis (:mod:`.power`): never above the exact map, means within about 0.1 voxel on analytic
    phantoms and 0.15 % on real bone, several times faster on wide marrow spaces.
    ``threads`` > 1 runs the distance transform and the painter on that many threads.
    """
    from .validate import check_binary, check_spacing, check_convention
    b = check_binary(binary)
    sp = check_spacing(spacing_zyx)
    check_convention(convention)
    if not b.any():
        return np.zeros(b.shape, np.float32)
    if b.all():  # no boundary anywhere: every sphere is unbounded
        return np.full(b.shape, np.nan, np.float32)
    if method not in METHODS:
        from .validate import MorphometryError
        raise MorphometryError(f"unknown local-thickness method {method!r}; use 'fast' or 'exact'")
    dsq = distance_sq(b, sp, threads=threads)
    return _thickness_from_dsq(b, dsq, sp, convention, method, threads)


@numba.njit(cache=True, nogil=True)
def _values_at(dsq, idx, sz, sy, sx, default_conv):
    nz, ny, nx = dsq.shape
    hs = (sz, sy, sx)
    val = np.empty(idx.shape[0], np.float32)
    for i in range(idx.shape[0]):
        f = idx[i]
        x = f % nx
        y = (f // nx) % ny
        z = f // (nx * ny)
        r = math.sqrt(dsq[z, y, x])
        val[i] = 2.0 * (_default_radius(dsq, z, y, x, r, hs) if default_conv else r)
    return val


@numba.njit(cache=True, nogil=True)
def _used_labels(a, phase_flat):
    """Sorted distinct labels of the phase voxels (a linear-time np.unique)."""
    used = np.zeros(a.shape[0], np.bool_)
    for i in range(a.shape[0]):
        if phase_flat[i] and a[i] >= 0:
            used[a[i]] = True
    return np.nonzero(used)[0]


def _thickness_from_dsq(b, dsq, sp, convention, method="fast", threads=1, *, r2_max=None, z0=0, z_range=None):
    """Local thickness map of phase ``b`` from its squared distance map ``dsq``.

    For a z-slab of a larger image (:mod:`.slabs`), ``r2_max`` is the whole image's largest squared distance
    (it sizes the exact method's containment table), ``z0`` the slab's first plane in the image and
    ``z_range`` the planes of the slab to paint (the map returned has only those).
    """
    sz, sy, sx = (float(x) for x in sp)
    if method == "exact":
        s_tab, cm_tab, r2_valid = _table((sz, sy, sx), float(dsq.max()) if r2_max is None else float(r2_max), REACH)
        offs, kind, dist = _neighbours(sp, REACH)
        idx, val = _ridge_values(dsq, sz, sy, sx, convention == "default", s_tab, cm_tab, r2_valid, offs, kind, dist)
    else:
        from .power import power_labels
        a, _ = power_labels(b.shape, dsq.ravel(), sz, sy, sx, threads > 1, z0)
        idx = _used_labels(a, b.ravel())
        val = _values_at(dsq, idx, sz, sy, sx, convention == "default")
    order = np.argsort(-val)
    return _paint(b, dsq, idx[order], val[order], sz, sy, sx, parallel=threads > 1, z_range=z_range)


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
