"""Small signed-distance helpers (numpy, vectorised; negative inside, in mm)."""

from __future__ import annotations

import numpy as np


def ellipsoid(p: np.ndarray, c, a) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (centre ``c``, semi-axes ``a``).

    Uses the first-order estimate ``k0 (k0 - 1) / k1`` with ``k0 = |q/a|``, ``k1 = |q/a^2|``:
    exact on spheres, smooth, and within a few per cent near the surface of moderate ellipsoids.
    """
    q = (p - np.asarray(c, dtype=p.dtype))
    a = np.asarray(a, dtype=p.dtype)
    k0 = np.sqrt(((q / a) ** 2).sum(-1))
    k1 = np.sqrt(((q / (a * a)) ** 2).sum(-1)) + 1e-12
    return k0 * (k0 - 1.0) / k1


def ellipse2(x: np.ndarray, y: np.ndarray, ax, ay) -> np.ndarray:
    """Approximate signed distance to an origin-centred ellipse in 2D (same estimate as above)."""
    k0 = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    k1 = np.sqrt((x / (ax * ax)) ** 2 + (y / (ay * ay)) ** 2) + 1e-12
    return k0 * (k0 - 1.0) / k1


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union (polynomial smooth minimum with blend width ``k`` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth intersection."""
    return -smin(-a, -b, k)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
