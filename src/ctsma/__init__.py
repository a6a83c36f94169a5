"""CT-SMA core: subchondral trabecular bone microstructure analysis from knee CT.

This package holds every algorithm of the project. It imports neither Qt nor Slicer,
so the Slicer modules, the ``ctsma`` command line and the tests all share it.
"""

__version__ = "0.1.0"

PARAMETERS = ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N")
"""The four reference trabecular parameters, with the exact keys used in every output."""

PARAMETER_FILE_NAMES = {"BV/TV": "bvtv", "Tb.Th": "tbth", "Tb.Sp": "tbsp", "Tb.N": "tbn"}
PARAMETER_UNITS = {"BV/TV": "", "Tb.Th": "mm", "Tb.Sp": "mm", "Tb.N": "1/mm", "BS/BV": "1/mm", "Conn.D": "1/mm^3"}

ROIS = {"MFC": 1, "LFC": 2, "MTP": 3, "LTP": 4}
"""Subchondral ROI keys and their label values (medial/lateral femoral condyle, tibial plateau)."""

BONES = {"femur": 1, "tibia": 2, "patella": 3, "fibula": 4}
"""Bone label values."""
