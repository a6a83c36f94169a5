"""Squared distance transform of a label image, compiled, bit for bit the ``edt`` package's.

:func:`edtsq_labels` gives what ``edt.edtsq(labels, anisotropy, black_border=False)`` gives (seung-lab's multi-label
transform, version 3.1, the one ``constraints.txt`` pins), bit for bit, in float32 storage and float64 arithmetic as
it does: every voxel of a non-zero label gets its squared distance (mm²) to the nearest voxel centre of another label
(label 0 included), label 0 gets 0, and a label with no other label in the image gets ``inf``. Another ``edt``
release may round differently; the distances then agree to float32 precision.

Why a second implementation of a library function: ``edt`` holds the GIL for the whole call, so the patches of
:func:`~ctsma.morphometry.measure_batch` could not share the cores while one of them was in its distance
transform; and on the small patches of a batch (64³, distances of a few voxels) a windowed minimum that the
compiler vectorises is about twice as fast as the lower envelope of parabolas. Compiled with ``nogil``, it
runs on one thread while other patches run on the others. Everything else (whole images, z-slabs, where distances
can span hundreds of voxels) keeps using ``edt``; the suite checks that both give identical arrays on random label
images of random shapes and spacings.

Algorithm: a first pass along x writes each voxel's distance to the end of its run of equal labels by two scans
(Rosenfeld & Pfaltz), as ``edt`` does. The passes along y and z then take, for each voxel, the least of the
previous pass's value at q (same label) or 0 (another label) plus the squared offset to q, over offsets of
increasing length until the squared offset reaches the largest value still to improve in the row (y) or in a
stretch of rows (z) (:func:`_window_pass`): the minimum that ``edt``'s lower envelope of parabolas (Felzenszwalb & Huttenlocher
2012) finds, each run's ends acting as zero-distance borders except at the image border, which is not a
boundary. Its cost grows with the distances (a row of long runs tries every offset), so it suits patches, not
whole images.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import viewer

CHUNK = 256  # voxels per stretch of a plane in the z pass: each stretch stops at its own largest distance
FLT_MAX = np.float32(np.finfo(np.float32).max)  # ``edt`` stands in FLT_MAX for inf during the parabolic passes


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _x_pass(w, lab, rows, n, a):
    """Squared 1-D distance (float32, ``a`` mm per voxel) to the end of each voxel's run, per row of ``n`` voxels."""
    zero = np.float32(0.0)
    for t in range(rows):
        base = t * n
        prev = lab[base]
        w[base] = zero if prev == 0 else np.float32(np.inf)
        for i in range(1, n):  # selects, not branches: the labels of trabecular bone are unpredictable
            s = lab[base + i]
            before = w[base + i - 1]
            # the run goes on (after label 0, whose distance is 0, that gives a as well); a new label's first voxel
            # is at a, and the last voxel of the run it ends, unless label 0, is at a too
            w[base + i - 1] = a if (s != prev and s != 0 and prev != 0) else before
            w[base + i] = zero if s == 0 else (before + a if s == prev else a)
            prev = s
        for i in range(n - 2, -1, -1):
            w[base + i] = min(w[base + i], w[base + i + 1] + a)
        for i in range(n):
            x = w[base + i] * w[base + i]
            w[base + i] = FLT_MAX if x == np.inf else x


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _offer(d, s, l1, l2, c64, c32):
    """``d = min(d, c + s)`` where the labels agree and ``min(d, c)`` where they differ (one row, vectorised)."""
    for i in range(d.shape[0]):
        f = np.float32(c64 + np.float64(s[i])) if l1[i] == l2[i] else c32
        d[i] = min(d[i], f)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _row_max(d):
    """The largest of ``d`` (float32, >= 0, no NaN). Taken over the bit patterns, which order non-negative floats
    as their values: an integer maximum vectorises, a float one does not (the compiler keeps its NaN rules)."""
    bits = d.view(np.int32)
    m = np.int32(0)
    for i in range(bits.shape[0]):
        m = max(m, bits[i])
    return viewer(m, numba.float32)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _window_pass(src, dst, lab, nz, ny, nx, axis, w2):
    """One pass along ``axis`` (1: y, 0: z): ``dst[p] = min over q of src_L(q) + w2 (p - q)^2`` on each column.

    ``src_L(q)`` is ``src[q]`` where q has p's label and 0 where it has another (a voxel of another label is a
    boundary at distance ``|p - q|``). The offsets ``o = |p - q|`` are tried in increasing order, a whole row
    (y pass) or a stretch of whole rows of about ``CHUNK`` voxels (z pass) of p at a time so that the inner loop
    runs along x and vectorises, and the loop stops once ``w2 o^2`` reaches the stretch's largest current value
    (no later offset can lower any of them; a stretch rather than the whole plane, so that one far voxel does not
    keep a whole plane trying offsets).
    Same values, bit for bit, as ``edt``'s lower envelope of each run's parabolas with the run ends as zero
    borders: the minimum of the same float64 sums, each rounded to float32.
    """
    n = nz if axis == 0 else ny
    plane = nx if axis == 1 else ny * nx
    step = nx if axis == 1 else ny * nx
    outer = nz if axis == 1 else 1
    width = max(nx, (CHUNK // nx) * nx) if axis == 0 else nx  # the z pass: whole rows, about CHUNK voxels at a time
    for zo in range(outer):
        base0 = zo * ny * nx if axis == 1 else 0
        for p in range(n):
            for c0 in range(0, plane, width):
                bp = base0 + p * step + c0
                m = min(width, plane - c0)
                d = dst[bp:bp + m]
                d[:] = src[bp:bp + m]
                l1 = lab[bp:bp + m]
                dmax = _row_max(d)
                for o in range(1, n):
                    c64 = w2 * float(o * o)
                    c32 = np.float32(c64)
                    if c32 >= dmax:
                        break
                    if p - o >= 0:
                        bq = bp - o * step
                        _offer(d, src[bq:bq + m], l1, lab[bq:bq + m], c64, c32)
                    if p + o < n:
                        bq = bp + o * step
                        _offer(d, src[bq:bq + m], l1, lab[bq:bq + m], c64, c32)
                    dmax = _row_max(d)


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
    t = np.empty(lf.shape[0], np.float32)
    _x_pass(w, lf, nz * ny, nx, np.float32(sx))
    fy, fz = np.float32(sy), np.float32(sz)
    _window_pass(w, t, lf, nz, ny, nx, 1, float(fy * fy))
    _window_pass(t, w, lf, nz, ny, nx, 0, float(fz * fz))
    for i in range(w.shape[0]):
        if w[i] >= FLT_MAX:
            w[i] = np.inf
    return w.reshape(lab.shape)
