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

Where only the mean of a map is wanted (the batch, :mod:`.batch`), :func:`paint_sum` runs the direct painter without
writing the map: it adds the number of voxels each sphere newly paints times its value, the map's sum bit for bit
(within the bound its docstring gives).

The sphere order itself comes from :func:`descending_order`, a stable radix sort of the values (tied spheres write
the same value, so their order could not change a map anyway).

Hand-written (numba): no maintained library paints balls of continuous radius with anisotropic spacing.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros
from numba.extending import intrinsic

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


@intrinsic
def _popcount(typingctx, m):
    """Number of set bits of an int64 (LLVM's ``ctpop``; numba has no public one)."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.int64(types.int64), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _gap(c, lo, hi):
    """Distance (voxels) from ``c`` to the interval ``[lo, hi]``."""
    return max(0, max(lo - c, c - hi))


RADIX_BITS = 13  # digit of the radix sort: two passes sort values that span up to 8 binades (a factor of 256)


@numba.njit(cache=True, nogil=True)
def descending_order(val):
    """Permutation that sorts float32 ``val`` in descending order: an LSD radix sort of the bit patterns.

    Linear time, several times faster than ``np.argsort`` on the sphere lists; stable (equal values keep their
    input order: ``np.argsort(-val, kind="stable")``, tested). The keys are taken relative to the smallest, so only
    the digits that the values' spread needs are sorted (a stable sort of the same keys gives the same permutation
    whatever the digits).
    """
    n = val.shape[0]
    bits = val.view(np.int32)
    key = np.empty(n, np.int64)
    kmin = np.int64(0xFFFFFFFF)
    kmax = np.int64(0)
    for i in range(n):
        b = np.int64(bits[i]) & 0xFFFFFFFF
        up = b ^ 0xFFFFFFFF if b >= 0x80000000 else b | 0x80000000  # ascending with the float value
        k = 0xFFFFFFFF - up
        key[i] = k
        kmin = min(kmin, k)
        kmax = max(kmax, k)
    for i in range(n):
        key[i] -= kmin
    span = kmax - kmin if n else 0
    order = np.arange(n)
    key2 = np.empty(n, np.int64)
    order2 = np.empty(n, np.int64)
    nb = 1 << RADIX_BITS
    count = np.empty(nb + 1, np.int64)
    shift = 0
    while span >> shift:
        count[:] = 0
        for i in range(n):
            count[((key[i] >> shift) & (nb - 1)) + 1] += 1
        for k in range(1, nb + 1):
            count[k] += count[k - 1]
        for i in range(n):
            k = (key[i] >> shift) & (nb - 1)
            j = count[k]
            count[k] = j + 1
            key2[j] = key[i]
            order2[j] = order[i]
        key, key2 = key2, key
        order, order2 = order2, order
        shift += RADIX_BITS
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
def _row_words(lab, label):
    """Bit masks of the voxels where ``lab == label``, WORD per int64 word along x: shape (nz * ny, ceil(nx / WORD)
    + 1), one row of words per (z, y) row, and a last word of 0 in each row (so that a chord's next word always
    exists). A boolean phase is ``lab = phase.view(np.uint8)``, ``label = 1``."""
    nz, ny, nx = lab.shape
    nw = (nx + WORD - 1) // WORD
    words = np.zeros((nz * ny, nw + 1), np.int64)
    for z in range(nz):
        for y in range(ny):
            for w in range(nw):
                m = np.int64(0)
                for x in range(w * WORD, min(nx, (w + 1) * WORD)):  # branch-free: phase voxels are unpredictable
                    m |= np.int64(lab[z, y, x] == label) << (x - w * WORD)
                words[z * ny + y, w] = m
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


@numba.njit(cache=True, nogil=True, inline="always")
def _hash(b, size):
    """Slot of the int32 ``b`` in a table of ``size`` (a power of two): a multiplicative hash's high bits (squared
    distances that differ by a power of 4 share their low bits)."""
    return ((np.int64(b) & 0xFFFFFFFF) * 0x9E3779B1 >> 16) & (size - 1)


@numba.njit(cache=True, nogil=True)
def _rehash(keys, slot, size):
    """The table (``keys``, ``slot``) re-inserted into one of ``size`` slots."""
    keys2 = np.zeros(size, np.int32)
    slot2 = np.full(size, -1, np.int64)
    for j in range(keys.shape[0]):
        if slot[j] >= 0:
            h = _hash(keys[j], size)
            while slot2[h] >= 0:
                h = (h + 1) & (size - 1)
            keys2[h] = keys[j]
            slot2[h] = slot[j]
    return keys2, slot2


@numba.njit(cache=True, nogil=True)
def _radius_kinds(d2, rad):
    """Distinct radii and each ball's index among them. A ball's radius is a function of its float32 squared
    distance ``d2``, so the balls are grouped by the bit pattern of ``d2`` in an open-addressing hash table, in
    the order of their first ball (the radii are few: lattice distances)."""
    n = d2.shape[0]
    bits = d2.view(np.int32)
    kind = np.empty(n, np.int64)
    radii = np.empty(n)
    size = 1024
    keys = np.zeros(size, np.int32)
    slot = np.full(size, -1, np.int64)
    k = 0
    for i in range(n):
        b = bits[i]
        h = _hash(b, size)
        while True:
            found = slot[h]
            if found < 0:  # a new radius
                keys[h] = b
                slot[h] = k
                radii[k] = rad[i]
                found = k
                k += 1
                if 2 * k > size:  # keep the table at most half full
                    size *= 4
                    keys, slot = _rehash(keys, slot, size)
                break
            if keys[h] == b:
                break
            h = (h + 1) & (size - 1)
        kind[i] = found
    return radii[:k], kind


@numba.njit(cache=True, nogil=True, inline="always")
def _take(todo, row, w, lo, hi):
    """Mark the unassigned voxels of bits ``lo..hi`` of word ``w`` of ``row`` as painted; returns them (a mask).
    Branch-free: a word with none of them is written back unchanged."""
    m = todo[row, w]
    hit = m & _bits(lo, hi)
    todo[row, w] = m ^ hit
    return hit


@numba.njit(cache=True, nogil=True)
def _direct(todo, left, out, cz, cy, cx, kind, val, start, cdz, cdy, ch, ny, nx):
    """:func:`_paint_direct`'s loop on the row bit masks ``todo`` (:func:`_row_words`) of ``left`` unassigned voxels.

    Writes each painted voxel's value into ``out`` (nz, ny, nx), or, when ``out`` is empty, only counts them: returns
    the sum (float64) of the values painted, in both cases. Balls whose chords all lie inside the image (the
    most) take the chords' row offsets in the row-major ``todo`` from a table and skip the bounds tests. Without a
    map to write the loop has no data-dependent branch but the rare chord that crosses a word boundary: trabecular
    bone makes such branches unpredictable, and mispredicted ones cost more than the bit operations."""
    write = out.size > 0
    nk = start.shape[0] - 1
    ext_z = np.zeros(nk, np.int64)  # per radius: the largest |dz|, |dy| and half-width of its chords
    ext_y = np.zeros(nk, np.int64)
    ext_x = np.zeros(nk, np.int64)
    roff = np.empty(cdz.shape[0], np.int64)
    for k in range(nk):
        for c in range(start[k], start[k + 1]):
            ext_z[k] = max(ext_z[k], abs(cdz[c]))
            ext_y[k] = max(ext_y[k], abs(cdy[c]))
            ext_x[k] = max(ext_x[k], ch[c])
            roff[c] = cdz[c] * ny + cdy[c]
    nz = todo.shape[0] // ny if ny > 0 else 0
    total = 0.0
    for i in range(cz.shape[0]):
        if left == 0:
            break
        z0, y0, x0, k = cz[i], cy[i], cx[i], kind[i]
        v = val[i]
        vd = np.float64(v)
        inside = (z0 - ext_z[k] >= 0 and z0 + ext_z[k] < nz and y0 - ext_y[k] >= 0 and y0 + ext_y[k] < ny
                  and x0 - ext_x[k] >= 0 and x0 + ext_x[k] < nx)
        r0 = z0 * ny + y0
        painted = 0
        if inside and not write and 2 * ext_x[k] < WORD:  # every chord within two words: no branch at all
            for c in range(start[k], start[k + 1]):
                row = r0 + roff[c]
                xa = x0 - ch[c]
                wa = xa // WORD
                lo = xa - wa * WORD
                hi = lo + 2 * ch[c]  # < 2 WORD - 1
                hit = _take(todo, row, wa, lo, min(hi, WORD - 1))
                m2 = todo[row, wa + 1]  # bits 0..hi - WORD of the next word, none when hi < WORD
                hit2 = m2 & ((np.int64(1) << max(hi - WORD + 1, 0)) - 1)
                todo[row, wa + 1] = m2 ^ hit2
                painted += _popcount(hit) + _popcount(hit2)
            left -= painted
            total += vd * painted
            continue
        for c in range(start[k], start[k + 1]):
            if inside:
                row = r0 + roff[c]
                xa, xb = x0 - ch[c], x0 + ch[c]
            else:
                z = z0 + cdz[c]
                y = y0 + cdy[c]
                if z < 0 or z >= nz or y < 0 or y >= ny:
                    continue
                row = z * ny + y
                xa, xb = max(0, x0 - ch[c]), min(nx - 1, x0 + ch[c])
                if xa > xb:
                    continue
            wa, wb = xa // WORD, xb // WORD
            for w in range(wa, wb + 1):
                base = w * WORD
                hit = _take(todo, row, w, max(xa, base) - base, min(xb, base + WORD - 1) - base)
                painted += _popcount(hit)
                if write:
                    z, y = z0 + cdz[c], y0 + cdy[c]
                    while hit:
                        out[z, y, base + _low(hit)] = v
                        hit &= hit - 1
        left -= painted
        total += vd * painted
    return total


@numba.njit(cache=True, nogil=True)
def _paint_direct(phase, out, cz, cy, cx, kind, val, start, cdz, cdy, ch):
    """Paint the spheres one after the other over the whole image, each voxel once (small spheres).

    Sphere ``i`` covers the chords ``start[kind[i]]:start[kind[i] + 1]`` of :func:`_chords`: the same rows and
    x intervals as the block painter, so the same map. The unassigned voxels are bit masks per row. No block
    lists and no square roots per sphere, which is cheaper when the spheres are a few voxels wide (thin
    structures, small patches).
    """
    nz, ny, nx = phase.shape
    todo = _row_words(phase.view(np.uint8), 1)
    _direct(todo, np.count_nonzero(phase), out, cz, cy, cx, kind, val, start, cdz, cdy, ch, ny, nx)


DIRECT_MAX = 40  # paint directly when the balls' bounding boxes hold at most this many voxels per phase voxel


@numba.njit(cache=True, nogil=True)
def _box_voxels(rad, sz, sy, sx):
    """Voxels (rows when ``sx`` is 0) of the bounding box of a ball of each radius."""
    n = (2 * np.floor(rad / sz) + 1) * (2 * np.floor(rad / sy) + 1)
    if sx:
        n *= 2 * np.floor(rad / sx) + 1
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def unravel_reciprocals(ny, nx):
    """What :func:`unravel` needs for an image of ``ny`` rows of ``nx`` voxels per plane."""
    nyx = ny * nx
    return (nyx, nx, 1.0 / nyx, 1.0 / nx) if nyx else (nyx, nx, 0.0, 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def unravel(f, rec):
    """(z, y, x) of the flat index ``f``, ``rec`` from :func:`unravel_reciprocals`: floating-point reciprocals
    instead of integer divisions (several times cheaper). ``(f + 0.5) / n`` is at least ``0.5 / n`` from an integer
    and its rounding error is far below that for any ``f < 2**51``, so its floor is ``f // n`` exactly."""
    nyx, nx, inv_yx, inv_x = rec
    z = np.int64((f + 0.5) * inv_yx)
    rem = f - z * nyx
    y = np.int64((rem + 0.5) * inv_x)
    return z, y, rem - y * nx


@numba.njit(cache=True, nogil=True)
def sphere_arrays(shape, order_idx, d2):
    """Centres (z, y, x) and radii (mm, shrunk by 1e-6 so that voxel centres on a sphere are outside) of the balls
    at the flat indices ``order_idx``, whose squared distances are ``d2``."""
    nz, ny, nx = shape
    n = order_idx.shape[0]
    cz = np.empty(n, np.int64)
    cy = np.empty(n, np.int64)
    cx = np.empty(n, np.int64)
    rad = np.empty(n)
    rec = unravel_reciprocals(ny, nx)
    for i in range(n):
        cz[i], cy[i], cx[i] = unravel(order_idx[i], rec)
        rad[i] = math.sqrt(np.float64(d2[i])) * (1.0 - 1e-6)
    return cz, cy, cx, rad


@numba.njit(cache=True, nogil=True)
def _direct_tables(d2, rad, n_phase, sz, sy, sx):
    """The direct painter's radius kinds and chord tables, or an empty ``start`` when the block painter should paint
    (balls too large for the direct painter to be the faster, or chord tables that would be large). Either painter
    gives the same map, so this choice only decides the speed. The balls' bounding boxes are summed per radius (one
    box per distinct radius, times its balls)."""
    radii, kind = _radius_kinds(d2, rad)
    per_kind = np.zeros(radii.shape[0])
    for i in range(kind.shape[0]):
        per_kind[kind[i]] += 1.0
    boxes = (_box_voxels(radii, sz, sy, sx) * per_kind).sum()
    if boxes <= DIRECT_MAX * n_phase and _box_voxels(radii, sz, sy, 0.0).sum() <= n_phase / 2:
        start, cdz, cdy, ch = _chords(radii, sz, sy, sx)  # (the second test keeps the chord tables < 12 B/voxel)
        return kind, start, cdz, cdy, ch
    e = np.zeros(0, np.int64)
    return e, e, e, e, e


@numba.njit(cache=True, nogil=True)
def paint_serial(phase, dsq_flat, order_idx, order_val, sz, sy, sx, lo, hi):
    """:func:`paint` on one thread, planes ``lo:hi``; one compiled call that runs without the GIL."""
    d2 = dsq_flat[order_idx]
    cz, cy, cx, rad = sphere_arrays(phase.shape, order_idx, d2)
    val = order_val.astype(np.float32)
    if lo > 0 or hi < phase.shape[0]:
        keep = np.maximum(np.maximum(lo - cz, cz - (hi - 1)), 0) * sz < rad  # the open ball meets the planes
        cz, cy, cx, rad, val, d2 = cz[keep] - lo, cy[keep], cx[keep], rad[keep], val[keep], d2[keep]
    ph = phase[lo:hi]
    out = np.zeros(ph.shape, np.float32)
    n_phase = max(1, np.count_nonzero(ph))
    kind, start, cdz, cdy, ch = _direct_tables(d2, rad, n_phase, sz, sy, sx)
    if start.shape[0]:
        _paint_direct(ph, out, cz, cy, cx, kind, val, start, cdz, cdy, ch)
        return out
    counts, items = block_lists(ph.shape, cz, cy, cx, rad, sz, sy, sx, BLOCK)
    _paint_blocks_serial(ph, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, BLOCK)
    return out


@numba.njit(cache=True, nogil=True)
def paint_sum(lab, label, dsq_flat, order_idx, order_val, sz, sy, sx):
    """The sum (float64) of the map :func:`paint_serial` paints on the voxels of ``lab == label`` with these spheres,
    without writing the map where the direct painter paints (it counts each row word's newly painted bits). The
    values are float32, all multiples of the unit in the last place of the smallest in magnitude, so every partial
    sum is exact in float64 while (voxels) x (largest / smallest non-zero |value|) < 2**29 (a 64³ patch: any ratio up
    to 2,048), and then the sum does not depend on its order: it is the map's sum bit for bit. Where the block
    painter paints (wide spheres), it paints the map and sums it."""
    d2 = dsq_flat[order_idx]
    cz, cy, cx, rad = sphere_arrays(lab.shape, order_idx, d2)
    val = order_val.astype(np.float32)
    nz, ny, nx = lab.shape
    todo = _row_words(lab, label)
    left = 0
    for r in range(todo.shape[0]):
        for w in range(todo.shape[1]):
            left += _popcount(todo[r, w])
    kind, start, cdz, cdy, ch = _direct_tables(d2, rad, max(1, left), sz, sy, sx)
    if start.shape[0]:
        return _direct(todo, left, np.zeros((0, 0, 0), np.float32), cz, cy, cx, kind, val, start, cdz, cdy, ch,
                       ny, nx)
    phase = lab == label
    out = np.zeros(lab.shape, np.float32)
    counts, items = block_lists(lab.shape, cz, cy, cx, rad, sz, sy, sx, BLOCK)
    _paint_blocks_serial(phase, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, BLOCK)
    total = 0.0
    for v in out.ravel():
        total += v
    return total


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
    cz, cy, cx, rad = sphere_arrays(phase.shape, order_idx, dsq.ravel()[order_idx])
    val = order_val.astype(np.float32)
    if z_range is not None:
        keep = np.maximum(np.maximum(lo - cz, cz - (hi - 1)), 0) * sz < rad  # the open ball meets the planes
        cz, cy, cx, rad, val = cz[keep] - lo, cy[keep], cx[keep], rad[keep], val[keep]
    ph = phase[lo:hi]
    out = np.zeros(ph.shape, np.float32)
    counts, items = block_lists(ph.shape, cz, cy, cx, rad, sz, sy, sx, BLOCK)
    _paint_blocks_parallel(ph, out, counts, items, cz, cy, cx, rad, val, sz, sy, sx, BLOCK)
    return out
