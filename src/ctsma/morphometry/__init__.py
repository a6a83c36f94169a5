"""Trabecular bone morphometry: binarisation, local thickness, standard parameters, maps.

Public API::

    from ctsma.morphometry import local_thickness, measure, measure_batch, binarise

Lengths are in mm, arrays are (z, y, x) and spacings are given as (z, y, x) in mm unless a SimpleITK
image supplies them. See ``docs/morphometry.md``.
"""

from .api import measure
from .batch import measure_batch
from .binarise import binarise, bvf_binarise
from .maps import sliding_window_maps
from .parameters import MorphometryWarning, measure_binary
from .thickness import CONVENTIONS, local_thickness
from .validate import MorphometryError

__all__ = ["local_thickness", "measure", "measure_batch", "binarise", "bvf_binarise", "measure_binary", "sliding_window_maps",
           "MorphometryError", "MorphometryWarning", "CONVENTIONS"]
