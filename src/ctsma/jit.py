"""Compile CT-SMA's numba kernels ahead of their first use, into numba's on-disk cache.

The phantom and the morphometry engine are numba kernels compiled on first use (``cache=True``): about half a
minute of one core on a fresh checkout, which every process that starts before the cache exists pays again. The
demo's two phantom workers, for instance, both compiled the same kernels side by side on their first knee.
``make venv`` therefore runs ``python -m ctsma.jit`` on one core while pip installs the rest of the environment
on the other. It calls the real code on tiny inputs, so the kernels are compiled for the argument types that the
demo, the command line and the tests pass: a small phantom knee (anatomy, texture, truth and the batch
morphometry that measures it), the MR reference's binarisation, and the whole-volume local thickness on one and
on two threads.

Usage: ``python -m ctsma.jit`` (prints what it compiled and how long it took). Numba keeps the cache beside the
sources (``__pycache__``), keyed by the source files and the CPU; a changed source is recompiled on its next use,
so running this is never required, only faster.
"""

from __future__ import annotations

import tempfile
import time

# a knee small enough to build in a few seconds once compiled (the tests' tiny phantom)
TINY_KNEE = {"mr_spacing": [0.9, 0.45, 0.45], "mr_fov": [84.0, 66.0, 30.0], "mr_subsample_mm": 0.3,
             "ct_spacing": [1.0, 1.0, 1.5], "ct_fov": [150.0, 150.0, 48.0], "ct_subsample_mm": 0.5,
             "truth_spacing": 0.05, "truth_patch_mm": 1.6, "truth_patches_per_roi": 1, "field_spacing": 4.0}


def _phantom() -> None:
    from .phantom import generate_knee, make_settings

    with tempfile.TemporaryDirectory(prefix="ctsma_jit_") as tmp:
        generate_knee(make_settings("demo", TINY_KNEE), 0, 0, tmp)


def _mr_reference() -> None:
    import numpy as np

    from .morphometry import bvf_binarise, measure_batch

    rng = np.random.default_rng(0)
    mr = rng.random((12, 12, 12)).astype(np.float32)
    roi = np.zeros(mr.shape, bool)
    roi[2:10, 2:10, 2:10] = True
    bone, mask, _ = bvf_binarise(mr, roi)
    measure_batch(bone[None], (0.125, 0.125, 0.125), masks=mask[None], workers=1)


def _local_thickness() -> None:
    import numpy as np

    from .morphometry import local_thickness
    from .morphometry.parameters import phase_pair_thickness

    rng = np.random.default_rng(0)
    bone = rng.random((24, 24, 24)) < 0.4
    for threads in (1, 2):  # measure / ctsma morphometry: both phases at once; one thread, or several
        phase_pair_thickness(bone, ~bone, (0.5, 0.5, 0.5), "default", threads)
    local_thickness(bone, (0.5, 0.5, 0.5))


STEPS = (("phantom knee", _phantom), ("MR reference", _mr_reference), ("local thickness", _local_thickness))


def warm_up(report=print) -> dict[str, float]:
    """Run every step; returns the seconds each took (mostly compiling when the cache is empty)."""
    import warnings

    seconds = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random inputs give the warnings a user would see for such data
        for name, step in STEPS:
            t = time.perf_counter()
            step()
            seconds[name] = time.perf_counter() - t
            report(f"ctsma.jit: {name}: {seconds[name]:.1f} s")
    return seconds


if __name__ == "__main__":
    warm_up()
