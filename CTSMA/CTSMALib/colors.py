"""CT-SMA colour tables for parameter maps, and display settings (range, background hidden).

The lookup tables are Slicer colour-table files in the extension's ``Resources/ColorTables/``
(perceptual maps, 256 entries, made by ``Resources/ColorTables/make_tables.py``), so the same
colours are used in the scene, in Slicer's colour legend and in the PDF reports.
"""

from __future__ import annotations

import math
from pathlib import Path

from ctsma.resources import resource_path

# Display ranges in physical units (a typical trabecular range for each parameter), for maps whose analysis records
# none: `ctsma infer` records its model's (summary.json, "display_range": the training references' mean ± 3 SD).
DISPLAY_RANGE = {"BV/TV": (0.05, 0.55), "Tb.Th": (0.05, 0.45), "Tb.Sp": (0.3, 1.5), "Tb.N": (0.5, 2.5)}
UNCERTAINTY_FRACTION = 0.25  # uncertainty maps show 0 .. 25 % of the parameter's range
TABLE_FILE = {"BV/TV": "CTSMA_BVTV.txt", "Tb.Th": "CTSMA_TbTh.txt", "Tb.Sp": "CTSMA_TbSp.txt",
              "Tb.N": "CTSMA_TbN.txt", "uncertainty": "CTSMA_Uncertainty.txt"}


def color_table_node(scene, key: str):
    """The colour-table node for ``key`` (a parameter or 'uncertainty'), read once per scene."""
    import slicer

    name = Path(TABLE_FILE[key]).stem
    existing = scene.GetFirstNodeByName(name)
    if existing is not None:
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    storage = slicer.vtkMRMLColorTableStorageNode()
    storage.SetFileName(str(resource_path("ColorTables", TABLE_FILE[key])))
    if not storage.ReadData(node):
        raise RuntimeError(f"cannot read colour table {TABLE_FILE[key]}")
    return node


def show_parameter_map(node, param: str, uncertainty: bool = False, value_range=None) -> None:
    """Colour table and a fixed window/level in physical units: ``value_range`` (the analysis's model's, from
    ``summary.json``) or :data:`DISPLAY_RANGE`; the background (0) is below the threshold."""
    lo, hi = value_range if value_range is not None else DISPLAY_RANGE[param]
    if uncertainty:
        lo, hi = 0.0, (hi - lo) * UNCERTAINTY_FRACTION
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color_table_node(node.GetScene(), "uncertainty" if uncertainty else param).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lo, hi)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(1e-6)  # hide the documented background value 0 outside the ROIs
    display.SetUpperThreshold(1e9)


def recorded_range(summary, param: str):
    """The display range that ``summary.json`` records for ``param`` (two finite numbers, low below high), or None
    (an analysis of an earlier version, or a model file without target statistics)."""
    value = ((summary or {}).get("display_range") or {}).get(param) if isinstance(summary, dict) else None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo < hi else None
