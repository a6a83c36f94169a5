"""Coronal slices of SimpleITK images in radiological display orientation, without copying the volume.

The study knee images may be large (512 × 512 × 400 voxels), so this works on NumPy views in index space:
the image's direction matrix tells which array axis runs anterior–posterior (the slicing axis), which runs
inferior–superior (rows, superior at the top) and which runs right–left (columns, the patient's right on
the viewer's left, as radiologists view images).
"""

from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk


def display_axes(img: sitk.Image) -> dict:
    """Map the physical LPS axes to index axes of ``img``.

    Returns ``{"lr": i, "ap": j, "si": k, "flip_lr": bool, "flip_si": bool}`` where i, j, k are ITK index
    axes (0 = x, 1 = y, 2 = z; the NumPy array axis is ``2 - i``).
    """
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)  # column c: physical direction of index axis c
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[p[c], c]) for c in range(3)))
    phys_to_index = {best[c]: c for c in range(3)}  # physical axis (0: L, 1: P, 2: S) -> index axis
    lr, ap, si = phys_to_index[0], phys_to_index[1], phys_to_index[2]
    return {"lr": lr, "ap": ap, "si": si, "flip_lr": bool(d[0, lr] < 0), "flip_si": bool(d[2, si] > 0)}


def coronal(arr: np.ndarray, axes: dict, index: int) -> np.ndarray:
    """The coronal slice ``index`` (along the A–P index axis) of a NumPy (z, y, x) array, in display order.

    Row 0 is the most superior row; column 0 is the patient's right.
    """
    sl = np.take(arr, index, axis=2 - axes["ap"])
    rest = [a for a in (2, 1, 0) if a != axes["ap"]]  # index axes left in sl, in array order
    rows_first = rest.index(axes["si"]) == 0
    s2 = sl if rows_first else sl.T
    if axes["flip_si"]:
        s2 = s2[::-1, :]
    if axes["flip_lr"]:
        s2 = s2[:, ::-1]
    return s2


def coronal_spacing(img: sitk.Image, axes: dict) -> tuple[float, float]:
    """(row spacing, column spacing) in mm of a coronal slice."""
    sp = img.GetSpacing()
    return float(sp[axes["si"]]), float(sp[axes["lr"]])


def best_coronal_index(labels: np.ndarray, axes: dict, value: int | None = None) -> int | None:
    """The coronal slice holding most voxels of ``value`` (any non-zero label when None)."""
    mask = labels != 0 if value is None else labels == value
    ap_arr = 2 - axes["ap"]
    counts = mask.sum(axis=tuple(a for a in range(3) if a != ap_arr))
    return int(np.argmax(counts)) if counts.max() > 0 else None
