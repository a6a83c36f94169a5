"""Squared distance transform of a label image, compiled, bit for bit the ``edt`` package's.

:func:`edtsq_labels` reproduces ``edt.edtsq(labels, anisotropy, black_border=False)`` (seung-lab's multi-label
transform, version 3.1, the one ``constraints.txt`` pins) operation for operation, in float32 storage and float64
envelope arithmetic as it does: every voxel of a non-zero label gets its squared distance (mm²) to the nearest
voxel centre of another label (label 0 included), label 0 gets 0, and a label with no other label in the image
gets ``inf``. Another ``edt`` release may round differently; the distances then agree to float32 precision.

Why a second implementation of a library function: ``edt`` holds the GIL for the whole call, so the patches of
:func:`~ctsma.morphometry.measure_batch` could not share the cores while one of them was in its distance
transform (a third of a patch's time). Compiled with ``nogil``, it runs on one thread while other patches
run on the others. Everything else (whole images, z-slabs) keeps using ``edt``; the suite checks that
both give identical arrays on random label images of random shapes and spacings.

Algorithm (as in ``edt``): a first pass along x writes each voxel's distance to the end of its run of equal
labels by two scans (Rosenfeld & Pfaltz), then one lower-envelope-of-parabolas pass along y and one along z
(Felzenszwalb & Huttenlocher 2012), each over the runs of one label with the run's ends as zero-distance
borders except at the image border, which is not a boundary.
"""

from __future__ import annotations

import math

import numba
import numpy as np

FLT_MAX = np.float32(np.finfo(np.float32).max)  # ``edt`` stands in FLT_MAX for inf during the parabolic passes


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _x_pass(w, lab, rows, n, a):
    """Squared 1-D distance (float32, ``a`` mm per voxel) to the end of each voxel's run, per row of ``n`` voxels."""
    for t in range(rows):
        base = t * n
        seg = lab[base]
        w[base] = np.float32(0.0) if seg == 0 else np.float32(np.inf)
        for i in range(1, n):
            s = lab[base + i]
            if s == 0:
                w[base + i] = 0.0
            elif s == seg:
                w[base + i] = w[base + i - 1] + a
            else:
                w[base + i] = a
                w[base + i - 1] = a if lab[base + i - 1] != 0 else np.float32(0.0)
                seg = s
        for i in range(n - 2, -1, -1):
            w[base + i] = min(w[base + i], w[base + i + 1] + a)
        for i in range(n):
            x = w[base + i] * w[base + i]
            w[base + i] = FLT_MAX if x == np.inf else x


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _run_envelope(w, b0, step, ln, w2, left, right, ff, v, ranges, s1, owner):
    """Lower envelope of one run's parabolas, written back; ``left``/``right``: the run ends at another label.

    Runs of one and two voxels (over a quarter of the runs in trabecular bone) take shortcuts that do the
    general loop's arithmetic for those lengths.
    """
    if ln == 1:
        if left or right:
            w[b0] = min(w[b0], np.float32(w2))
        return
    if ln == 2:
        f0, f1 = float(w[b0]), float(w[b0 + step])
        s = (f1 - f0 + w2) / (2.0 * w2)  # j = 1 against v = 0: factor1 = w2, factor2 = 1
        a0 = np.float32(w2 + f1) if s < 0.0 else w[b0]  # q = 0 lies right of the breakpoint: parabola 1
        a1 = w[b0 + step] if s < 1.0 else np.float32(w2 + f0)
        if left:
            a0 = min(a0, np.float32(w2))
            a1 = min(a1, np.float32(w2 * 4.0))
        if right:
            a0 = min(a0, np.float32(w2 * 4.0))
            a1 = min(a1, np.float32(w2))
        w[b0] = a0
        w[b0 + step] = a1
        return
    for j in range(ln):
        ff[j] = w[b0 + j * step]
    # Each parabola is first compared with its predecessor (the stack top when it arrives): those breakpoints
    # are computed up front, in a loop the compiler vectorises (factor1 = w2, factor2 = 2j - 1).
    for j in range(1, ln):
        s1[j] = (ff[j] - ff[j - 1] + w2 * float(2 * j - 1)) / (2.0 * w2)
    k = 0
    v[0] = 0
    ranges[0] = -np.inf
    rk = -np.inf
    for j in range(1, ln):
        s = s1[j]
        if k > 0 and s <= rk:  # the top is hidden: pop until the new parabola crosses the envelope
            while True:
                k -= 1
                vk = v[k]
                rk = ranges[k]
                f1 = float(j - vk) * w2
                f2 = float(j + vk)
                s = (ff[j] - ff[vk] + f1 * f2) / (2.0 * f1)
                if not (k > 0 and s <= rk):
                    break
        k += 1
        v[k] = j
        ranges[k] = s
        rk = s
    # Segment of each position without a data-dependent while: segment i starts at the first integer above
    # ranges[i] (clamped to the run), and the running maximum of the starts gives each position's segment.
    for j in range(ln + 1):
        owner[j] = -1
    owner[0] = 0
    for i in range(1, k + 1):
        t = min(max(ranges[i], -1.0), float(ln))
        owner[min(int(math.floor(t)) + 1, ln)] = i
    i = 0
    for j in range(ln):
        i = max(i, owner[j])
        dj = float(j - v[i])
        val = np.float32(w2 * (dj * dj) + ff[v[i]])
        if left:
            e = float(j + 1)
            val = min(val, np.float32(w2 * (e * e)))
        if right:
            e = float(ln - j)
            val = min(val, np.float32(w2 * (e * e)))
        w[b0 + j * step] = val


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _parabolic_pass(w, lab, nz, ny, nx, axis, w2, ff, v, ranges, s1, owner):
    """One pass along ``axis`` (1: y, 0: z) over every column's runs of one non-zero label."""
    n = (nz, ny, nx)[axis]
    m = nz * nx if axis == 1 else ny * nx
    step = nx if axis == 1 else ny * nx
    for t in range(m):
        base = (t // nx) * ny * nx + t % nx if axis == 1 else t
        seg = lab[base]
        last = 0
        for i in range(1, n + 1):
            s = lab[base + i * step] if i < n else seg
            if i < n and s == seg:
                continue
            if seg != 0:
                _run_envelope(w, base + last * step, step, i - last, w2, last > 0, i < n, ff, v, ranges, s1, owner)
            seg = s
            last = i


@numba.njit(cache=True, nogil=True, error_model="numpy")
def edtsq_labels(lab, sz, sy, sx):
    """Squared distances (mm², float32, shape of ``lab``) of the uint8 label image ``lab`` (z, y, x), C order.

    Bit for bit ``edt.edtsq(lab, anisotropy=(sz, sy, sx), black_border=False)``.
    """
    nz, ny, nx = lab.shape
    lf = lab.ravel()
    w = np.empty(lf.shape[0], np.float32)
    if lf.shape[0] == 0:
        return w.reshape(lab.shape)
    nmax = max(nz, ny)
    ff = np.empty(nmax)
    v = np.empty(nmax, np.int64)
    ranges = np.empty(nmax + 1)
    s1 = np.empty(nmax)
    owner = np.empty(nmax + 1, np.int64)
    _x_pass(w, lf, nz * ny, nx, np.float32(sx))
    fy, fz = np.float32(sy), np.float32(sz)
    _parabolic_pass(w, lf, nz, ny, nx, 1, float(fy * fy), ff, v, ranges, s1, owner)
    _parabolic_pass(w, lf, nz, ny, nx, 0, float(fz * fz), ff, v, ranges, s1, owner)
    for i in range(w.shape[0]):
        if w[i] >= FLT_MAX:
            w[i] = np.inf
    return w.reshape(lab.shape)
