"""Sphere painting: each phase voxel takes the value of the first sphere (in a given order) that contains it.

The spheres come sorted by descending value, so a voxel ends up with the largest value of the spheres containing
it. The image is cut into cache-sized blocks of ``BLOCK``³ voxels that are painted independently (in parallel
with ``parallel=True``), each from the list of spheres whose ball meets it, until the block is full.

Inside a block the unassigned voxels are bit masks: one word per (z, y) row (bit = x), and per plane a word of
the rows that still have unassigned voxels and the OR of those rows. A sphere is skipped with a few integer and
floating-point operations when its ball misses the bounding box of the block's unassigned voxels, a plane is
skipped when the ball's disc misses that plane's box, and a row when its x interval misses the row's unassigned
span, so the cost is dominated by the voxels written rather than by the spheres that merely graze a block.
Every test that skips work is conservative (see ``CULL``); the voxels a sphere paints are decided by the same
per-row interval as before (``|x - x0| <= h`` with ``(h sx)^2 < r^2 - dz^2 - dy^2``), so the map does not depend
on the culling or the block size.

When the balls are small (thin structures, small patches: their bounding boxes hold at most ``DIRECT_MAX``
voxels per phase voxel) they are painted one after the other over the whole image instead
(:func:`_paint_direct`): the row intervals of each distinct radius are tabulated once, and each ball applies
its radius's table to bit masks of the unassigned voxels. Same intervals, same order, so the same map.

The sphere order itself comes from :func:`descending_order`, a radix sort of the values (ties may be
ordered differently from ``np.argsort``, which cannot change a map: tied spheres write the same value).

Hand-written (numba): no maintained library paints balls of continuous radius with anisotropic spacing.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

BLOCK = 16  # edge (voxels) of the painter's blocks; at most 62 (a row is one int64 bit mask)
CULL = 1.0 + 1e-9  # a box is skipped only when clearly outside a ball: rounding never drops a voxel


@numba.njit(cache=True, nogil=True, inline="always")
def _bits(lo, hi):
    """Mask of the bits lo..hi (0 <= lo <= hi < 63)."""
    return ((2 << hi) - 1) ^ ((1 << lo) - 1)


@numba.njit(cache=True, nogil=True, inline="always")
def _low(m):
    return np.int64(trailing_zeros(m))


@numba.njit(cache=True, nogil=True, inline="always")
def _high(m):
    return np.int64(63 - leading_zeros(m))


@numba.njit(cache=True, nogil=True, inline="always")
def _gap(c, lo, hi):
    """Distance (voxels) from ``c`` to the interval ``[lo, hi]``."""
    return max(0, max(lo - c, c - hi))


@numba.njit(cache=True, nogil=True)
def descending_order(val):
    """Permutation that sorts float32 ``val`` in descending order: an LSD radix sort of the bit patterns.

    Linear time, several times faster than ``np.argsort`` on the sphere lists; equal values may come in
    another order than argsort's, which does not change any map (a voxel takes the first, i.e. the largest,
    value of the spheres containing it, and equal values are equal).
    """
    n = val.shape[0]
    bits = val.view(np.int32)
    key = np.empty(n, np.int64)
    for i in range(n):
        b = np.int64(bits[i]) & 0xFFFFFFFF
        up = b ^ 0xFFFFFFFF if b >= 0x80000000 else b | 0x80000000  # ascending with the float value
        key[i] = 0xFFFFFFFF - up
    order = np.arange(n)
    key2 = np.empty(n, np.int64)
    order2 = np.empty(n, np.int64)
    count = np.empty(2049, np.int64)
    for shift in (0, 11, 22):
        count[:] = 0
        for i in range(n):
            count[((key[i] >> shift) & 2047) + 1] += 1
        for k in range(1, 2049):
            count[k] += count[k - 1]
        for i in range(n):
            k = (key[i] >> shift) & 2047
            j = count[k]
            count[k] = j + 1
            key2[j] = key[i]
            order2[j] = order[i]
        key, key2 = key2, key
        order, order2 = order2, order
    return order


@numba.njit(cache=True, nogil=True)
def block_lists(shape, cz, cy, cx, rad, sz, sy, sx, B):
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
                ddz = _gap(z0, bz * B, bz * B + B - 1) * sz
                for by in range(ylo // B, yhi // B + 1):
                    ddy = _gap(y0, by * B, by * B + B - 1) * sy
                    if ddz * ddz + ddy * ddy >= r2:
                        continue
                    for bx in range(xlo // B, xhi // B + 1):
                        ddx = _gap(x0, bx * B, bx * B + B - 1) * sx
                        if ddz * ddz + ddy * ddy + ddx * ddx >= r2:
                            continue
                        k = (bz * nby + by) * nbx + bx
                        if second:
                            items[fill[k]] = i
                            fill[k] += 1
                        else:
                            counts[k + 1] += 1
    return counts, items


@numba.njit(cache=True, nogil=True, inline="always")
def _load_block(phase, z_a, z_b, y_a, y_b, x_a, x_b, B, rows, ymask, xplane):
    """Bit masks of the block's phase voxels; returns the mask of the planes that have any."""
    zmask = 0
    for z in range(z_a, z_b):
        lz = z - z_a
        ym = 0
        xm = 0
        for y in range(y_a, y_b):
            m = 0
            for x in range(x_a, x_b):
                if phase[z, y, x]:
                    m |= 1 << (x - x_a)
            rows[lz * B + y - y_a] = m
            if m:
                ym |= 1 << (y - y_a)
                xm |= m
        ymask[lz] = ym
        xplane[lz] = xm
        if ym:
            zmask |= 1 << lz
    return zmask


def _paint_blocks_py(phase, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, B):
    """Paint each block from its own sphere list, largest value first; blocks are independent."""
    nz, ny, nx = phase.shape
    nbz, nby, nbx = (nz + B - 1) // B, (ny + B - 1) // B, (nx + B - 1) // B
    for k_ in numba.prange(nbz * nby * nbx):
        k = np.int64(k_)  # parfor indices are unsigned: mixed with int64 they would type as float64
        bz, rem = divmod(k, nby * nbx)
        by, bx = divmod(rem, nbx)
        z_a, y_a, x_a = bz * B, by * B, bx * B
        z_b, y_b, x_b = min(z_a + B, nz), min(y_a + B, ny), min(x_a + B, nx)
        rows = np.empty(B * B, np.int64)  # bit lx: voxel (z_a + lz, y_a + ly, x_a + lx) is unassigned
        ymask = np.empty(B, np.int64)  # bit ly: row ly of plane lz has unassigned voxels
        xplane = np.empty(B, np.int64)  # OR of the rows of plane lz
        zmask = _load_block(phase, z_a, z_b, y_a, y_b, x_a, x_b, B, rows, ymask, xplane)
        dirty = True
        for j in range(counts[k], counts[k + 1]):
            if zmask == 0:
                break
            if dirty:  # bounding box of the unassigned voxels
                yall = 0
                xall = 0
                zm = zmask
                while zm:
                    lz = _low(zm)
                    zm &= zm - 1
                    yall |= ymask[lz]
                    xall |= xplane[lz]
                bz_lo, bz_hi = z_a + _low(zmask), z_a + _high(zmask)
                by_lo, by_hi = y_a + _low(yall), y_a + _high(yall)
                bx_lo, bx_hi = x_a + _low(xall), x_a + _high(xall)
                dirty = False
            i = items[j]
            z0, y0, x0, r, v = cz[i], cy[i], cx[i], rad[i], val[i]
            r2 = r * r
            gz = _gap(z0, bz_lo, bz_hi) * sz
            gy = _gap(y0, by_lo, by_hi) * sy
            gx = _gap(x0, bx_lo, bx_hi) * sx
            if gz * gz + gy * gy + gx * gx >= r2 * CULL:
                continue
            kz = int(r / sz)
            kz = min(kz, int(math.sqrt(max(r2 - gy * gy - gx * gx, 0.0)) / sz) + 1)  # planes that reach the box
            zlo, zhi = max(bz_lo, z0 - kz) - z_a, min(bz_hi, z0 + kz) - z_a
            if zlo > zhi:
                continue
            zm = zmask & _bits(zlo, zhi)
            while zm:
                lz = _low(zm)
                zm &= zm - 1
                z = lz + z_a
                rz2 = r2 - ((z - z0) * sz) ** 2
                if rz2 <= 0:
                    continue
                ym_all = ymask[lz]  # the plane's box of unassigned voxels against the ball's disc
                xm_all = xplane[lz]
                gy = _gap(y0, y_a + _low(ym_all), y_a + _high(ym_all)) * sy
                gx = _gap(x0, x_a + _low(xm_all), x_a + _high(xm_all)) * sx
                if gy * gy + gx * gx >= rz2 * CULL:
                    continue
                ky = int(math.sqrt(rz2) / sy)
                ky = min(ky, int(math.sqrt(max(rz2 - gx * gx, 0.0)) / sy) + 1)  # rows that can reach that box
                ylo, yhi = max(y_a, y0 - ky) - y_a, min(y_b - 1, y0 + ky) - y_a
                if ylo > yhi:
                    continue
                ym = ym_all & _bits(ylo, yhi)
                changed = False
                while ym:
                    ly = _low(ym)
                    ym &= ym - 1
                    y = ly + y_a
                    ry2 = rz2 - ((y - y0) * sy) ** 2
                    if ry2 <= 0:
                        continue
                    row = lz * B + ly
                    m = rows[row]
                    gx = _gap(x0, x_a + _low(m), x_a + _high(m)) * sx
                    if gx * gx >= ry2 * CULL:  # the row's unassigned span is outside the ball
                        continue
                    h = int(math.sqrt(ry2) / sx)
                    if (h * sx) ** 2 >= ry2:  # open ball: strictly inside
                        h -= 1
                    lo = max(x0 - h, x_a) - x_a
                    hi = min(x0 + h, x_b - 1) - x_a
                    if lo > hi:
                        continue
                    hit = m & _bits(lo, hi)
                    if hit == 0:
                        continue
                    rows[row] = m ^ hit
                    changed = True
                    while hit:
                        out[z, y, x_a + _low(hit)] = v
                        hit &= hit - 1
                    if rows[row] == 0:
                        ymask[lz] &= ~(1 << ly)
                if changed:
                    dirty = True
                    xm = 0
                    ym = ymask[lz]
                    while ym:
                        xm |= rows[lz * B + _low(ym)]
                        ym &= ym - 1
                    xplane[lz] = xm
                    if ymask[lz] == 0:
                        zmask &= ~(1 << lz)


# the serial build is safe to call from several threads at once; the parallel one spreads one image's blocks
_paint_blocks_serial = numba.njit(cache=True, nogil=True)(_paint_blocks_py)
_paint_blocks_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_paint_blocks_py)


WORD = 32  # bits of a row word in the direct painter (any x interval's mask is then a safe int64 shift)


@numba.njit(cache=True, nogil=True)
def _row_words(phase):
    """Bit masks of the phase voxels, WORD per int64 word along x: shape (nz, ny, ceil(nx / WORD))."""
    nz, ny, nx = phase.shape
    nw = (nx + WORD - 1) // WORD
    words = np.zeros((nz, ny, nw), np.int64)
    for z in range(nz):
        for y in range(ny):
            for w in range(nw):
                m = np.int64(0)
                for x in range(w * WORD, min(nx, (w + 1) * WORD)):  # branch-free: phase voxels are unpredictable
                    m |= np.int64(phase[z, y, x]) << (x - w * WORD)
                words[z, y, w] = m
    return words


@numba.njit(cache=True, nogil=True)
def _chords(radii, sz, sy, sx):
    """The rows ``(dz, dy)`` each open ball of radius ``radii[k]`` meets and the half-width ``h >= 0`` of its
    chord there (CSR: chords ``start[k]:start[k + 1]``), by the painter's arithmetic: a ball's voxels depend
    only on its radius, so balls of one radius share one table."""
    start = np.zeros(radii.shape[0] + 1, np.int64)
    for second in range(2):
        if second:
            for k in range(radii.shape[0]):
                start[k + 1] += start[k]
            dz_ = np.empty(start[-1], np.int64)
            dy_ = np.empty(start[-1], np.int64)
            h_ = np.empty(start[-1], np.int64)
        for k in range(radii.shape[0]):
            r = radii[k]
            r2 = r * r
            kz = int(r / sz)
            c = start[k]
            for dz in range(-kz, kz + 1):
                rz2 = r2 - (dz * sz) ** 2
                if rz2 <= 0:
                    continue
                ky = int(math.sqrt(rz2) / sy)
                for dy in range(-ky, ky + 1):
                    ry2 = rz2 - (dy * sy) ** 2
                    if ry2 <= 0:
                        continue
                    h = int(math.sqrt(ry2) / sx)
                    if (h * sx) ** 2 >= ry2:  # open ball: strictly inside
                        h -= 1
                    if h < 0:
                        continue
                    if second:
                        dz_[c], dy_[c], h_[c] = dz, dy, h
                    else:
                        start[k + 1] += 1
                    c += 1
    return start, dz_, dy_, h_


@numba.njit(cache=True, nogil=True)
def _radius_kinds(d2, rad):
    """Distinct radii and each ball's index among them; a ball's radius is a function of its float32 squared
    distance ``d2``, so the balls are grouped by a linear-time sort of ``d2``."""
    order = descending_order(d2)
    kind = np.empty(d2.shape[0], np.int64)
    radii = np.empty(d2.shape[0])
    k = -1
    for j in range(order.shape[0]):
        i = order[j]
        if j == 0 or d2[i] != d2[order[j - 1]]:
            k += 1
            radii[k] = rad[i]
        kind[i] = k
    return radii[:k + 1], kind


@numba.njit(cache=True, nogil=True)
def _paint_direct(phase, out, cz, cy, cx, kind, val, start, cdz, cdy, ch):
    """Paint the spheres one after the other over the whole image, each voxel once (small spheres).

    Sphere ``i`` covers the chords ``start[kind[i]]:start[kind[i] + 1]`` of :func:`_chords`: the same rows and
    x intervals as the block painter, so the same map. The unassigned voxels are bit masks per row. No block
    lists and no square roots per sphere, which is cheaper when the spheres are a few voxels wide (thin
    structures, small patches).
    """
    nz, ny, nx = phase.shape
    todo = _row_words(phase)
    left = np.count_nonzero(phase)
    for i in range(cz.shape[0]):
        if left == 0:
            break
        z0, y0, x0, k, v = cz[i], cy[i], cx[i], kind[i], val[i]
        for c in range(start[k], start[k + 1]):
            z = z0 + cdz[c]
            y = y0 + cdy[c]
            if z < 0 or z >= nz or y < 0 or y >= ny:
                continue
            xa, xb = max(0, x0 - ch[c]), min(nx - 1, x0 + ch[c])
            for w in range(xa // WORD, xb // WORD + 1 if xa <= xb else 0):
                base = w * WORD
                m = todo[z, y, w]
                hit = m & _bits(max(xa, base) - base, min(xb, base + WORD - 1) - base)
                if hit == 0:
                    continue
                todo[z, y, w] = m ^ hit
                while hit:
                    out[z, y, base + _low(hit)] = v
                    hit &= hit - 1
                    left -= 1


DIRECT_MAX = 40  # paint directly when the balls' bounding boxes hold at most this many voxels per phase voxel


@numba.njit(cache=True, nogil=True)
def _box_voxels(rad, sz, sy, sx):
    """Voxels (rows when ``sx`` is 0) of the balls' bounding boxes, summed."""
    n = (2 * np.floor(rad / sz) + 1) * (2 * np.floor(rad / sy) + 1)
    if sx:
        n *= 2 * np.floor(rad / sx) + 1
    return n.sum()


@numba.njit(cache=True, nogil=True)
def sphere_arrays(shape, order_idx, dsq_flat):
    """Centres (z, y, x) and radii (mm, shrunk by 1e-6 so that voxel centres on a sphere are outside) of balls."""
    nz, ny, nx = shape
    cz = order_idx // (nx * ny)
    cy = (order_idx // nx) % ny
    cx = order_idx % nx
    rad = np.sqrt(dsq_flat[order_idx].astype(np.float64)) * (1.0 - 1e-6)
    return cz, cy, cx, rad


@numba.njit(cache=True, nogil=True)
def paint_serial(phase, dsq_flat, order_idx, order_val, sz, sy, sx, lo, hi):
    """:func:`paint` on one thread, planes ``lo:hi``; one compiled call that runs without the GIL."""
    d2 = dsq_flat[order_idx]
    cz, cy, cx, rad = sphere_arrays(phase.shape, order_idx, dsq_flat)
    val = order_val.astype(np.float32)
    if lo > 0 or hi < phase.shape[0]:
        keep = np.maximum(np.maximum(lo - cz, cz - (hi - 1)), 0) * sz < rad  # the open ball meets the planes
        cz, cy, cx, rad, val, d2 = cz[keep] - lo, cy[keep], cx[keep], rad[keep], val[keep], d2[keep]
    ph = phase[lo:hi]
    out = np.zeros(ph.shape, np.float32)
    n_phase = max(1, np.count_nonzero(ph))
    if _box_voxels(rad, sz, sy, sx) <= DIRECT_MAX * n_phase:
        radii, kind = _radius_kinds(d2, rad)
        if _box_voxels(radii, sz, sy, 0.0) <= n_phase / 2:  # the chord tables stay small (< 12 B/voxel)
            start, cdz, cdy, ch = _chords(radii, sz, sy, sx)
            _paint_direct(ph, out, cz, cy, cx, kind, val, start, cdz, cdy, ch)
            return out
    counts, items = block_lists(ph.shape, cz, cy, cx, rad, sz, sy, sx, BLOCK)
    _paint_blocks_serial(ph, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, BLOCK)
    return out


def paint(phase, dsq, order_idx, order_val, sz, sy, sx, parallel=False, z_range=None):
    """Local thickness map: every phase voxel takes the value of the first sphere (in the given order) containing it.

    ``z_range=(lo, hi)`` paints only the planes ``lo:hi`` (the map returned has those planes), with the spheres
    that reach them: each voxel gets the same value as in the whole map. On one thread, small spheres are
    painted one after the other (:func:`_paint_direct`), larger ones block by block (both give the same map);
    ``parallel`` paints the blocks on numba's threads.
    """
    lo, hi = (0, phase.shape[0]) if z_range is None else (int(z_range[0]), int(z_range[1]))
    order_idx = np.ascontiguousarray(order_idx, np.int64)
    if not parallel:
        return paint_serial(phase, dsq.ravel(), order_idx, order_val, float(sz), float(sy), float(sx), lo, hi)
    cz, cy, cx, rad = sphere_arrays(phase.shape, order_idx, dsq.ravel())
    val = order_val.astype(np.float32)
    if z_range is not None:
        keep = np.maximum(np.maximum(lo - cz, cz - (hi - 1)), 0) * sz < rad  # the open ball meets the planes
        cz, cy, cx, rad, val = cz[keep] - lo, cy[keep], cx[keep], rad[keep], val[keep]
    ph = phase[lo:hi]
    out = np.zeros(ph.shape, np.float32)
    counts, items = block_lists(ph.shape, cz, cy, cx, rad, sz, sy, sx, BLOCK)
    _paint_blocks_parallel(ph, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, BLOCK)
    return out
